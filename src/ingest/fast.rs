//! A shortcut for the one line shape devices actually send.
//!
//! Nearly every line is `{"sensor":"…","value":…,"timestamp":"…","device":"…"}`:
//! four known keys, ASCII strings without escapes, a plain number. Running a general
//! JSON parser per line (set-up, UTF-8 validation, serde's field machinery) was a
//! quarter of the server's CPU during ingest. [`scan`] recognises exactly that shape —
//! keys in any order, any JSON whitespace — and answers `None` for anything else:
//! escapes, control bytes, any byte outside ASCII (so it needs no UTF-8 check), unknown
//! or repeated keys, `null`, nested values, numbers that are not finite. Those lines go
//! to sonic-rs as before, so the shortcut never decides anything the full parser would
//! decide differently; a differential test holds it to that.
//!
//! Even so, it was the largest single cost of a bulk import (a third of the request
//! handlers' samples, session 34): strings are now scanned eight bytes at a time,
//! a key is told by its first letter, and short decimals are converted exactly
//! without the general float parser: 103 → 58 ns a line of the bench's data, its
//! best of seven passes over 300,000 lines.

use std::borrow::Cow;

use super::wire::{Number, Wire};

/// The fields of a line in the common shape, or `None` to leave it to the full parser.
pub(super) fn scan(line: &[u8]) -> Option<Wire<'_>> {
    let mut c = Cursor { s: line, i: 0 };
    c.ws();
    c.eat(b'{')?;
    let (mut sensor, mut value, mut timestamp, mut device) = (None, None, None, None);
    loop {
        c.ws();
        let key = c.key()?;
        c.ws();
        c.eat(b':')?;
        c.ws();
        match key {
            Key::Sensor => once(&mut sensor, c.string()?)?,
            Key::Timestamp => once(&mut timestamp, c.string()?)?,
            Key::Device => once(&mut device, c.string()?)?,
            Key::Value => once(&mut value, c.number()?)?,
        }
        c.ws();
        match c.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    c.ws();
    if c.i != line.len() {
        return None;
    }
    Some(Wire {
        sensor: Cow::Borrowed(sensor?),
        value: Number(value?),
        timestamp: Cow::Borrowed(timestamp?),
        device: device.map(Cow::Borrowed),
    })
}

/// Fills `slot`, or `None` if the key came before (serde refuses that).
fn once<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(v);
            Some(())
        }
    }
}

enum Key {
    Sensor,
    Value,
    Timestamp,
    Device,
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

/// Powers of ten that are exact doubles, for [`Cursor::number`].
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// Eight bytes at a time: a word with every byte `b`.
const fn splat(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.peek() {
            self.i += 1;
        }
    }

    /// One of the four keys, quotes included, told by its first letter and then
    /// compared whole (each comparison of a constant length, which compiles to a
    /// few loads rather than a call to `memcmp`).
    fn key(&mut self) -> Option<Key> {
        let rest = &self.s[self.i..];
        let is = |quoted: &[u8]| rest.get(..quoted.len()) == Some(quoted);
        let (key, len) = match rest.get(1)? {
            b's' if is(b"\"sensor\"") => (Key::Sensor, 8),
            b'v' if is(b"\"value\"") => (Key::Value, 7),
            b't' if is(b"\"timestamp\"") => (Key::Timestamp, 11),
            b'd' if is(b"\"device\"") => (Key::Device, 8),
            _ => return None,
        };
        self.i += len;
        Some(key)
    }

    /// A string of printable ASCII without escapes, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        // Eight bytes at a time while eight remain: the first byte that is a quote, a
        // backslash, a control character or not ASCII ends the run (the lowest flagged
        // byte of each test below is exact; higher ones may be false alarms).
        while let Some(word) = self.s.get(self.i..self.i + 8) {
            let w = u64::from_le_bytes(word.try_into().ok()?);
            let zero = |x: u64| x.wrapping_sub(splat(1)) & !x;
            let stop =
                (zero(w ^ splat(b'"')) | zero(w ^ splat(b'\\')) | w.wrapping_sub(splat(0x20)) | w)
                    & splat(0x80);
            if stop != 0 {
                self.i += (stop.trailing_zeros() / 8) as usize;
                break;
            }
            self.i += 8;
        }
        loop {
            match self.peek()? {
                b'"' => break,
                // An escape, a raw control character or a byte outside ASCII: the
                // full parser decides.
                b'\\' | 0..0x20 | 0x80.. => return None,
                _ => self.i += 1,
            }
        }
        self.i += 1;
        let ascii = &self.s[start..self.i - 1];
        // SAFETY: every byte of `ascii` passed the loops above, which end the string
        // at any byte outside ASCII: ASCII is valid UTF-8. (`from_utf8` checked
        // it again: 14 % of the scan.)
        Some(unsafe { std::str::from_utf8_unchecked(ascii) })
    }

    /// A JSON number, converted as sonic-rs converts it: integers that fit 64 bits
    /// through the integer, everything else correctly rounded, zero without a sign;
    /// not finite → `None`.
    fn number(&mut self) -> Option<f64> {
        let start = self.i;
        // The digits' value, ignoring the decimal point (exact while it matters:
        // only up to 15 digits are used).
        let mut mantissa = 0u64;
        let digits = |c: &mut Self, m: &mut u64| {
            let from = c.i;
            while let Some(d) = c.peek().filter(u8::is_ascii_digit) {
                *m = m.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                c.i += 1;
            }
            c.i - from
        };
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let int_start = self.i;
        let int_digits = digits(self, &mut mantissa);
        if int_digits == 0 || (int_digits > 1 && self.s[int_start] == b'0') {
            return None;
        }
        let (mut integer, mut exponent, mut fraction) = (true, false, 0);
        if self.peek() == Some(b'.') {
            self.i += 1;
            fraction = digits(self, &mut mantissa);
            if fraction == 0 {
                return None;
            }
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if digits(self, &mut 0) == 0 {
                return None;
            }
            (integer, exponent) = (false, true);
        }
        // Up to 15 digits are exact in a double, and so is 10^k for k ≤ 22: one
        // division is then correctly rounded (Clinger's fast path), as the general
        // parser's answer is. Zero keeps to the rules below.
        if !exponent && int_digits + fraction <= 15 && mantissa != 0 {
            let v = mantissa as f64 / POW10[fraction];
            return Some(if negative { -v } else { v });
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        if integer {
            if let Ok(v) = text.parse::<u64>() {
                return Some(v as f64);
            }
            if let Ok(v) = text.parse::<i64>() {
                return Some(v as f64);
            }
        }
        let v = text.parse::<f64>().ok().filter(|v| v.is_finite())?;
        match v == 0.0 {
            false => Some(v),
            // sonic-rs reads `-0.0` as +0.0 but keeps the sign of an underflow such as
            // `-1e-400`: plain zeros are taken unsigned, the others left to it.
            true if exponent => None,
            true => Some(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::invariants::fields;

    fn full(line: &[u8]) -> Option<(String, u64, String, Option<String>)> {
        let w: Wire<'_> = sonic_rs::from_slice(line).ok()?;
        Some(fields(&w))
    }

    #[test]
    fn takes_the_common_shapes() {
        for line in [
            r#"{"sensor":"speed","value":60.1062,"timestamp":"2026-01-01T00:00:00.024Z","device":"car-1"}"#,
            r#"{"sensor": "speed", "value": 55.5, "timestamp": "2012-04-23T18:25:43.511Z"}"#,
            r#"  { "timestamp" : "2012-04-23T18:25:43Z" ,"value":-3,"sensor":"fuel" }  "#,
            r#"{"device":"a b","sensor":"rpm","value":1e3,"timestamp":"x"}"#,
            "{\t\"sensor\":\"s\",\r\"value\":0.5,\"timestamp\":\"t\"}",
            r#"{"sensor":"speed","value":-0.00125,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":123456789.012345,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":1234567890123456,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":0.1,"timestamp":"a string longer than eight bytes"}"#,
        ] {
            let got = scan(line.as_bytes()).unwrap_or_else(|| panic!("not taken: {line}"));
            assert_eq!(Some(fields(&got)), full(line.as_bytes()), "{line}");
        }
    }

    #[test]
    fn leaves_everything_else_to_the_full_parser() {
        for line in [
            r#"{"sensor":"sp\"eed","value":1,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"t","extra":1}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"t","device":null}"#,
            r#"{"sensor":"speed","sensor":"fuel","value":1,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":1,"value":2,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":"1","timestamp":"t"}"#,
            r#"{"sensor":"speed","value":1e999,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":01,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":1.,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"t"} x"#,
            r#"{"sensor":"speed","value":1,"timestamp":"t",}"#,
            r#"{"sensor":"speed","timestamp":"t"}"#,
            // Outside ASCII: the full parser checks the UTF-8.
            r#"{"sensor":"spëed","value":1,"timestamp":"t"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"2026-01-01T00:00:00.000Z","device":"vän"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"2026-01-01T00:00:00.000Z\u0041"}"#,
            r#"{}"#,
            r#"[1]"#,
        ] {
            assert!(scan(line.as_bytes()).is_none(), "taken: {line}");
        }
        assert!(scan(b"{\"sensor\":\"sp\xffeed\",\"value\":1,\"timestamp\":\"t\"}").is_none());
        assert!(scan(b"{\"sensor\":\"sp\teed\",\"value\":1,\"timestamp\":\"t\"}").is_none());
    }

    /// Whatever the shortcut takes, the full parser takes with the same result.
    /// Lines are built from fragments and then damaged at random (a deterministic
    /// generator, so a failure reproduces).
    #[test]
    fn never_disagrees_with_the_full_parser() {
        let keys = ["sensor", "value", "timestamp", "device", "other", "Sensor"];
        let strings = [
            "speed",
            "",
            "a b",
            "x\\\"y",
            "é",
            "2026-01-01T00:00:00Z",
            "\u{1}",
            // Longer than a word, with what ends the fast scan at several places.
            "2026-01-01T00:00:00.024Z",
            "a-device-name-long-enough",
            "0123456789\\\"abc",
            "abcdefghé",
            "abcdefgh\u{1f}x",
            "abcdefg\u{7f}",
        ];
        let numbers = [
            "0",
            "-0",
            "1",
            "-1",
            "0.5",
            "-0.0",
            "0.0",
            "-0e0",
            "0e5",
            "-0.000",
            "-1e-400",
            "1e3",
            "1E-3",
            "2.5e+2",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "1e308",
            "1e309",
            "0.1e-400",
            "123456789012345678901234567890",
            "60.1062",
            "-2288.4224",
            "0.000001",
            "123456789012345",
            "1234567890.12345",
            "1234567890.123456",
            "9007199254740993",
            "0.30000000000000004",
            "01",
            "1.",
            ".5",
            "+1",
            "-",
            "1e",
            "true",
            "null",
            "\"1\"",
            "[1]",
            "{}",
        ];
        let spaces = ["", " ", "\t", "  \r "];
        const PUNCT: &[u8] = b"{}[],:\"\\ 0-e.";
        let mut rng = fastrand::Rng::with_seed(7);
        let mut taken = 0;
        for _ in 0..200_000 {
            // Mostly well-formed readings, keys in any order, some fields missing,
            // mistyped or repeated, some unknown keys; then a few damaged bytes.
            let mut line_keys: Vec<&str> = ["sensor", "value", "timestamp", "device"]
                .into_iter()
                .filter(|_| rng.u8(..10) > 0)
                .collect();
            if rng.u8(..10) == 0 {
                line_keys.push(keys[rng.usize(..keys.len())]);
            }
            rng.shuffle(&mut line_keys);
            let mut line = String::from(spaces[rng.usize(..spaces.len())]);
            line.push('{');
            for (f, key) in line_keys.iter().enumerate() {
                if f > 0 {
                    line.push(',');
                }
                line.push_str(spaces[rng.usize(..spaces.len())]);
                line.push_str(&format!("\"{key}\""));
                line.push_str(spaces[rng.usize(..spaces.len())]);
                line.push(':');
                line.push_str(spaces[rng.usize(..spaces.len())]);
                let numeric = (*key == "value") != (rng.u8(..10) == 0);
                if numeric {
                    line.push_str(numbers[rng.usize(..numbers.len())]);
                } else {
                    line.push_str(&format!("\"{}\"", strings[rng.usize(..strings.len())]));
                }
                line.push_str(spaces[rng.usize(..spaces.len())]);
            }
            line.push('}');
            let mut bytes = line.into_bytes();
            for _ in 0..[0, 0, 1, 2][rng.usize(..4)] {
                let at = rng.usize(..bytes.len());
                match rng.u8(0..3) {
                    0 => drop(bytes.remove(at)),
                    1 => bytes.insert(at, PUNCT[rng.usize(..PUNCT.len())]),
                    _ => bytes[at] = rng.u8(..),
                }
            }
            if let Some(w) = scan(&bytes) {
                taken += 1;
                assert_eq!(
                    Some(fields(&w)),
                    full(&bytes),
                    "{:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        assert!(taken > 5_000, "the shortcut took only {taken} lines");
    }
}

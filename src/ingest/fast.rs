//! A shortcut for the one line shape devices actually send.
//!
//! Nearly every line is `{"sensor":"…","value":…,"timestamp":"…","device":"…"}`:
//! four known keys, strings without escapes, a plain number. Running a general JSON
//! parser per line (set-up, UTF-8 validation, serde's field machinery) was a quarter
//! of the server's CPU during ingest. [`scan`] recognises exactly that shape — keys in
//! any order, any JSON whitespace — and answers `None` for anything else: escapes,
//! control bytes, invalid UTF-8, unknown or repeated keys, `null`, nested values,
//! numbers that are not finite. Those lines go to sonic-rs as before, so the shortcut
//! never decides anything the full parser would decide differently; a differential
//! test holds it to that.

use std::borrow::Cow;

use super::wire::{Number, Wire};

/// The fields of a line in the common shape, or `None` to leave it to the full parser.
pub(super) fn scan(line: &[u8]) -> Option<Wire<'_>> {
    // One UTF-8 check for the whole line; strings are then cut at ASCII quotes, which
    // are always character boundaries.
    let text = std::str::from_utf8(line).ok()?;
    let mut c = Cursor { s: text, i: 0 };
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
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
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

    /// One of the four keys, quotes included, compared whole rather than scanned.
    fn key(&mut self) -> Option<Key> {
        let rest = &self.s.as_bytes()[self.i..];
        let (key, len) = [
            (Key::Sensor, &b"\"sensor\""[..]),
            (Key::Value, b"\"value\""),
            (Key::Timestamp, b"\"timestamp\""),
            (Key::Device, b"\"device\""),
        ]
        .into_iter()
        .find_map(|(k, quoted)| rest.starts_with(quoted).then_some((k, quoted.len())))?;
        self.i += len;
        Some(key)
    }

    /// A string without escapes, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        // Strings here are a few dozen bytes: a plain loop beats memchr's set-up.
        loop {
            match self.peek()? {
                b'"' => break,
                // An escape or a raw control character: the full parser decides.
                b'\\' | 0..0x20 => return None,
                _ => self.i += 1,
            }
        }
        self.i += 1;
        self.s.get(start..self.i - 1)
    }

    /// A JSON number, converted as sonic-rs converts it: integers that fit 64 bits
    /// through the integer, everything else correctly rounded, zero without a sign;
    /// not finite → `None`.
    fn number(&mut self) -> Option<f64> {
        let start = self.i;
        let digits = |c: &mut Self| {
            let from = c.i;
            while c.peek().is_some_and(|b| b.is_ascii_digit()) {
                c.i += 1;
            }
            c.i - from
        };
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        let int_digits = digits(self);
        if int_digits == 0 || (int_digits > 1 && self.s.as_bytes()[int_start] == b'0') {
            return None;
        }
        let (mut integer, mut exponent) = (true, false);
        if self.peek() == Some(b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return None;
            }
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if digits(self) == 0 {
                return None;
            }
            (integer, exponent) = (false, true);
        }
        let text = self.s.get(start..self.i)?;
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
            r#"{"sensor":"spëed","value":1,"timestamp":"t"}"#,
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

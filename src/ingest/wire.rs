//! A reading as it arrives on the wire, before it is checked: what both parsers
//! produce — the fast path (`fast.rs`) and the full one (`ndjson.rs`, sonic-rs and
//! serde) — so neither parser module depends on the other for it.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Visitor};

/// A reading as it arrives on the wire.
#[derive(Deserialize)]
pub(crate) struct Wire<'a> {
    #[serde(borrow)]
    pub(crate) sensor: Cow<'a, str>,
    pub(crate) value: Number,
    #[serde(borrow)]
    pub(crate) timestamp: Cow<'a, str>,
    #[serde(borrow, default)]
    pub(crate) device: Option<Cow<'a, str>>,
}

/// A JSON number, and only that: strings, null and booleans are refused.
pub(crate) struct Number(pub(crate) f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a finite number for `value`")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

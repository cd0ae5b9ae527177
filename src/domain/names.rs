//! Enums whose values have names (in configurations, the database, the command line
//! and error messages): one table per enum, written once in [`named_enum!`], and one
//! error for a name that is not in it.

/// A name that is none of an enum's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{given}': use one of {allowed}")]
pub struct UnknownName {
    what: &'static str,
    given: String,
    allowed: String,
}

impl UnknownName {
    /// `given` is not one of `names` (of a `what`, e.g. "algorithm").
    pub fn new(what: &'static str, given: &str, names: &[&str]) -> Self {
        Self {
            what,
            given: given.to_owned(),
            allowed: names.join(", "),
        }
    }
}

/// An enum of unit variants, each with its name: `as_str`, `ALL`, `NAMES`, a
/// case-insensitive `FromStr` whose error is [`UnknownName`], and `Display`.
///
/// ```ignore
/// named_enum! {
///     /// Which steps an alert is interested in.
///     pub enum Direction as "direction" {
///         /// Only steps up.
///         Up = "up",
///         Down = "down",
///     }
/// }
/// ```
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident as $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The name of every value, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name, as configurations, the database and messages write it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::domain::UnknownName;

            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(s))
                    .ok_or_else(|| $crate::domain::UnknownName::new($what, s, Self::NAMES))
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    named_enum! {
        /// A test enum.
        enum Colour as "colour" {
            /// Red.
            Red = "red",
            /// Dark blue.
            DarkBlue = "darkblue",
        }
    }

    #[test]
    fn names_round_trip_case_insensitively_and_unknown_ones_list_the_known() {
        for c in Colour::ALL {
            assert_eq!(c.as_str().parse::<Colour>(), Ok(*c));
            assert_eq!(c.to_string(), c.as_str());
        }
        assert_eq!("DarkBlue".parse::<Colour>(), Ok(Colour::DarkBlue));
        let e = "green".parse::<Colour>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown colour 'green': use one of red, darkblue"
        );
    }
}

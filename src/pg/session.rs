//! Statements about the session rather than the data, answered by the listener
//! itself: drivers and tools send them around their queries (`BEGIN` before a
//! psycopg query, `SET application_name`, `SHOW server_version`). The sandbox
//! refuses every statement that is not a read, so these never reach it: harmless
//! ones are acknowledged and change nothing, anything else is refused by name.

use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

/// What the listener answers to a session statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// `BEGIN`, `START TRANSACTION`: every query reads one snapshot of its own
    /// anyway; the tag is all a driver needs.
    Begin,
    /// `COMMIT`, `END`, `ROLLBACK`, `ABORT` (the tag given).
    End(&'static str),
    /// A command acknowledged without effect (the tag given).
    Ack(&'static str),
    /// `SET statement_timeout`, `RESET statement_timeout`, `RESET ALL`: the
    /// session's own time limit for its queries, within `--sql-timeout` (`None`:
    /// the server's).
    Timeout {
        /// The limit.
        limit: Option<Duration>,
        /// The command's tag.
        tag: &'static str,
    },
    /// `SHOW name`: one row, one column named after the setting.
    Show {
        /// The setting's name, as asked.
        name: String,
        /// Its value.
        value: String,
    },
    /// Refused, with the reason and its SQLSTATE.
    Refused {
        /// SQLSTATE.
        code: &'static str,
        /// Why.
        message: String,
    },
}

/// Settings a client may set: they change how a client formats and labels
/// things, which Milepost either does the same way already or does not need.
const SETTABLE: [&str; 11] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "extra_float_digits",
    "intervalstyle",
    "timezone",
    "search_path",
    "client_min_messages",
    "standard_conforming_strings",
    "bytea_output",
    "default_transaction_read_only",
];

static SET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?is)^SET\s+(?:SESSION\s+|LOCAL\s+)?([a-z_][a-z0-9_.]*)(?:\s*(?:=|TO)\s*|\s+)(.*)$",
    )
    .expect("SET pattern")
});
static SHOW: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?is)^SHOW\s+([a-z_][a-z0-9_.]*)$").expect("SHOW pattern"));

/// The session statement `sql` is, if it is one.
pub fn classify(sql: &str) -> Option<Session> {
    let text = sql.trim().trim_end_matches(';').trim();
    let upper = text.to_ascii_uppercase();
    let words: Vec<&str> = upper.split_whitespace().collect();
    let first = *words.first()?;
    Some(match first {
        "BEGIN" | "START" if first == "BEGIN" || words.get(1) == Some(&"TRANSACTION") => {
            Session::Begin
        }
        "COMMIT" | "END" => Session::End("COMMIT"),
        "ROLLBACK" | "ABORT" => Session::End("ROLLBACK"),
        "DISCARD" => Session::Ack("DISCARD ALL"),
        "DEALLOCATE" => Session::Ack("DEALLOCATE"),
        "RESET" if matches!(words.get(1), Some(&("ALL" | "STATEMENT_TIMEOUT"))) => {
            Session::Timeout {
                limit: None,
                tag: "RESET",
            }
        }
        "RESET" => Session::Ack("RESET"),
        "UNLISTEN" => Session::Ack("UNLISTEN"),
        "SET" => set(text),
        "SHOW" => show(text),
        _ => return None,
    })
}

fn set(text: &str) -> Session {
    let captures = SET.captures(text);
    let name = captures
        .as_ref()
        .map(|c| c[1].to_ascii_lowercase())
        .unwrap_or_default();
    if name == "statement_timeout" {
        let value = captures
            .as_ref()
            .map_or("", |c| c.get(2).map_or("", |m| m.as_str()));
        return match timeout(value) {
            Some(limit) => Session::Timeout { limit, tag: "SET" },
            None => Session::Refused {
                code: "22023",
                message: format!(
                    "invalid value for parameter \"statement_timeout\": {}",
                    value.trim()
                ),
            },
        };
    }
    // `SET TRANSACTION READ ONLY`, `SET SESSION CHARACTERISTICS AS TRANSACTION …`:
    // every query already runs alone in a snapshot of its own.
    if text.to_ascii_uppercase().contains(" TRANSACTION ") {
        return Session::Ack("SET");
    }
    if SETTABLE.contains(&name.as_str()) {
        Session::Ack("SET")
    } else {
        Session::Refused {
            code: "0A000",
            message: format!(
                "SET {} is not supported: Milepost's SQL is read-only and its settings are fixed",
                if name.is_empty() { "…" } else { &name }
            ),
        }
    }
}

/// A `statement_timeout` as PostgreSQL reads it: milliseconds, or a number with a
/// unit (`us`, `ms`, `s`, `min`, `h`, `d`), quoted or not; 0 and `DEFAULT` are no
/// limit of the session's own (`Some(None)`). `None` if it is none of those.
fn timeout(value: &str) -> Option<Option<Duration>> {
    let v = value.trim().trim_matches(|c| c == '\'' || c == '"').trim();
    if v.eq_ignore_ascii_case("default") {
        return Some(None);
    }
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let ms = number
        * match unit.trim() {
            "" | "ms" => 1.0,
            "us" => 0.001,
            "s" => 1e3,
            "min" => 60e3,
            "h" => 3600e3,
            "d" => 86_400e3,
            _ => return None,
        };
    // PostgreSQL rounds to whole milliseconds; 0 is no limit.
    let ms = ms.round();
    if ms > i32::MAX as f64 {
        return None;
    }
    Some((ms >= 1.0).then(|| Duration::from_millis(ms as u64)))
}

/// A session's `statement_timeout` as `SHOW` gives it.
pub fn show_timeout(limit: Option<Duration>) -> String {
    match limit {
        None => "0".into(),
        Some(d) if d.as_millis() % 1000 == 0 => format!("{}s", d.as_secs()),
        Some(d) => format!("{}ms", d.as_millis()),
    }
}

fn show(text: &str) -> Session {
    // pgJDBC's `getTransactionIsolation()`; PostgreSQL names the column after the
    // setting.
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| w.to_ascii_lowercase())
        .collect();
    if words[1..] == ["transaction", "isolation", "level"] {
        return show("SHOW transaction_isolation");
    }
    let Some(asked) = SHOW.captures(text).map(|c| c[1].to_owned()) else {
        return Session::Refused {
            code: "42601",
            message: "SHOW takes the name of one setting".into(),
        };
    };
    match crate::store::sql::setting(&asked.to_ascii_lowercase()) {
        Some(value) => Session::Show {
            name: asked.to_ascii_lowercase(),
            value: value.to_owned(),
        },
        None => Session::Refused {
            code: "42704",
            message: format!("unrecognized configuration parameter \"{asked}\""),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_statements_are_answered_and_the_rest_left_to_the_sandbox() {
        assert_eq!(classify("BEGIN"), Some(Session::Begin));
        assert_eq!(classify("begin read only;"), Some(Session::Begin));
        assert_eq!(
            classify("START TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
            Some(Session::Begin)
        );
        assert_eq!(classify("commit"), Some(Session::End("COMMIT")));
        assert_eq!(classify("ROLLBACK"), Some(Session::End("ROLLBACK")));
        assert_eq!(
            classify("SET application_name = 'grafana'"),
            Some(Session::Ack("SET"))
        );
        assert_eq!(
            classify("SET extra_float_digits TO 3"),
            Some(Session::Ack("SET"))
        );
        assert_eq!(classify("set TimeZone 'UTC'"), Some(Session::Ack("SET")));
        assert_eq!(
            classify("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Some(Session::Ack("SET"))
        );
        assert!(matches!(
            classify("SET memory_limit = '10GB'"),
            Some(Session::Refused { code: "0A000", .. })
        ));
        assert!(matches!(
            classify("SET enable_external_access = true"),
            Some(Session::Refused { code: "0A000", .. })
        ));
        assert_eq!(
            classify("SHOW server_version"),
            Some(Session::Show {
                name: "server_version".into(),
                value: super::super::SERVER_VERSION.into()
            })
        );
        assert_eq!(
            classify("show transaction isolation level"),
            Some(Session::Show {
                name: "transaction_isolation".into(),
                value: "read committed".into()
            })
        );
        assert!(matches!(
            classify("SHOW temp_directory"),
            Some(Session::Refused { code: "42704", .. })
        ));
        assert!(matches!(
            classify("SHOW TABLES"),
            Some(Session::Refused { .. })
        ));
        // statement_timeout: the session's own limit.
        for (text, ms) in [
            ("SET statement_timeout = 1500", Some(1500)),
            ("SET statement_timeout TO '5s'", Some(5000)),
            ("set statement_timeout = '1min'", Some(60_000)),
            ("SET SESSION statement_timeout = 0", None),
            ("SET statement_timeout TO DEFAULT", None),
        ] {
            assert_eq!(
                classify(text),
                Some(Session::Timeout {
                    limit: ms.map(Duration::from_millis),
                    tag: "SET"
                }),
                "{text}"
            );
        }
        assert!(matches!(
            classify("SET statement_timeout = 'soon'"),
            Some(Session::Refused { code: "22023", .. })
        ));
        assert_eq!(
            classify("RESET ALL"),
            Some(Session::Timeout {
                limit: None,
                tag: "RESET"
            })
        );
        assert_eq!(show_timeout(Some(Duration::from_millis(1500))), "1500ms");
        assert_eq!(show_timeout(Some(Duration::from_secs(5))), "5s");
        assert_eq!(classify("SELECT 1"), None);
        assert_eq!(classify("  "), None);
        assert_eq!(classify("START readings"), None);
    }
}

//! The names PostgreSQL gives a result's columns, for the PostgreSQL listener.
//! DuckDB names an unaliased expression after its text (`avg("value")`,
//! `count_star()`, `(value * 2)`); PostgreSQL after the function (`avg`,
//! `count`), the column, or `?column?` (its `FigureColname`). Tools take series
//! and field names from these: a Grafana panel's `avg(value)` is a series named
//! `avg`, as against PostgreSQL itself. Aliased columns keep their alias.

use serde_json::Value;

/// The column names PostgreSQL would give the result of the statement whose
/// syntax tree (DuckDB's `json_serialize_sql`) is `tree`; `None` when they cannot
/// be told from it (a `*`, `COLUMNS(…)`, anything but a plain `SELECT` list).
pub(super) fn postgres(tree: &Value) -> Option<Vec<String>> {
    node_names(&tree["statements"][0]["node"])
}

fn node_names(node: &Value) -> Option<Vec<String>> {
    match node["type"].as_str()? {
        "SELECT_NODE" => node["select_list"]
            .as_array()?
            .iter()
            .map(expression_name)
            .collect(),
        // A set operation's columns are named by its first branch.
        "SET_OPERATION_NODE" => match &node["left"] {
            Value::Object(_) => node_names(&node["left"]),
            _ => node_names(&node["children"][0]),
        },
        _ => None,
    }
}

/// An expression's name: its alias, else PostgreSQL's rule. `None` for a star.
fn expression_name(e: &Value) -> Option<String> {
    if let Some(alias) = e["alias"].as_str().filter(|a| !a.is_empty()) {
        return Some(alias.to_owned());
    }
    strong_name(e).or_else(|| match e["class"].as_str() {
        Some("STAR") => None,
        _ => Some("?column?".to_owned()),
    })
}

/// The name an expression gives its column by itself (PostgreSQL's
/// `FigureColnameInternal`), if any.
fn strong_name(e: &Value) -> Option<String> {
    match (e["class"].as_str()?, e["type"].as_str().unwrap_or_default()) {
        ("COLUMN_REF", _) => e["column_names"]
            .as_array()?
            .last()?
            .as_str()
            .map(str::to_owned),
        ("FUNCTION", _) if e["is_operator"] == Value::Bool(true) => None,
        ("FUNCTION" | "WINDOW", _) => {
            let name = e["function_name"].as_str()?;
            Some(match name {
                "count_star" => "count".to_owned(),
                // `extract(epoch FROM ts)`: DuckDB reads it as date_part.
                other => other.to_owned(),
            })
        }
        // `ts::date` is named `ts`, `'x'::VARCHAR` after its type, as PostgreSQL
        // names them.
        ("CAST", _) => strong_name(&e["child"])
            .or_else(|| {
                e["cast_type"]["type_name"]
                    .as_str()
                    .map(super::catalog::typname)
            })
            .or_else(|| {
                e["type_expr"]["type_name"]
                    .as_str()
                    .map(super::catalog::typname)
            }),
        ("CASE", _) => Some("case".to_owned()),
        ("OPERATOR", "OPERATOR_COALESCE") => Some("coalesce".to_owned()),
        ("SUBQUERY", _) if e["subquery_type"] == "EXISTS" => Some("exists".to_owned()),
        ("SUBQUERY", _) if e["subquery_type"] == "SCALAR" => node_names(&e["subquery"]["node"])?
            .into_iter()
            .next()
            .filter(|n| n != "?column?"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> Option<Vec<String>> {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        let json: String = conn
            .query_row("SELECT json_serialize_sql(?::VARCHAR)", [sql], |r| r.get(0))
            .unwrap();
        postgres(&serde_json::from_str(&json).unwrap())
    }

    #[test]
    fn columns_are_named_as_postgresql_names_them() {
        assert_eq!(
            names(
                "SELECT count(*), avg(value), value * 2, ts::date, CASE WHEN true THEN 1 END,
                        1, sensor, r.device, coalesce(value, 0), sum(value) OVER (),
                        value > 1, (SELECT max(value) FROM readings), EXISTS (SELECT 1),
                        date_trunc('hour', ts), avg(value) AS mean, 'x'::VARCHAR
                 FROM readings r"
            )
            .unwrap(),
            [
                "count",
                "avg",
                "?column?",
                "ts",
                "case",
                "?column?",
                "sensor",
                "device",
                "coalesce",
                "sum",
                "?column?",
                "max",
                "exists",
                "date_trunc",
                "mean",
                "varchar"
            ]
        );
        assert_eq!(
            names("SELECT 1::DOUBLE, 2::int, 3::DECIMAL(10, 2)").unwrap(),
            ["float8", "int4", "numeric"]
        );
        assert_eq!(
            names("SELECT avg(value) FROM a UNION ALL SELECT 1 AS one FROM b").unwrap(),
            ["avg"]
        );
        assert_eq!(
            names("WITH t AS (SELECT 1 AS x) SELECT x, count(*) FROM t GROUP BY ALL").unwrap(),
            ["x", "count"]
        );
        // A star's columns cannot be told from the text: DuckDB's names stand.
        assert_eq!(names("SELECT *, avg(value) FROM readings"), None);
        assert_eq!(names("SELECT r.* FROM readings r"), None);
    }
}

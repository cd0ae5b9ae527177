//! The catalog users' tools read: psql's `\dt` and `\d readings`, drivers' type
//! look-ups, Grafana's table and column pickers all query `pg_catalog` and
//! `information_schema`. DuckDB emulates both, but over the database it runs in,
//! where they would list every internal table. So those queries run on a second,
//! in-memory DuckDB instance that holds the contract's six relations as empty
//! tables with the views' columns and types, and nothing else: no data, file and
//! network access off, its configuration locked. What it answers is the contract.
//!
//! psql writes a few PostgreSQL-only forms DuckDB's parser does not take
//! (`OPERATOR(pg_catalog.~)`, `COLLATE pg_catalog.default`), and tools call
//! functions DuckDB lacks (`pg_get_userbyid`, `quote_ident`, …): [`compatible`]
//! rewrites the former, macros on the instance stand in for the latter.

use std::borrow::Cow;
use std::sync::LazyLock;

use duckdb::{Config, Connection};
use regex::Regex;

use super::RELATIONS;
use crate::store::StoreError;
use crate::store::pool::Pool;

/// Functions that exist only on the catalog instance (macros below): calling one
/// sends the query there.
pub(super) const CATALOG_FUNCTIONS: [&str; 24] = [
    "pg_relation_is_publishable",
    "format_type",
    "_pg_expandarray",
    "pg_get_function_result",
    "pg_get_function_arguments",
    "pg_get_function_identity_arguments",
    "pg_get_expr",
    "pg_get_constraintdef",
    "pg_get_indexdef",
    "pg_get_triggerdef",
    "pg_get_userbyid",
    "quote_ident",
    "array_lower",
    "array_upper",
    "parse_ident",
    "pg_encoding_to_char",
    "obj_description",
    "col_description",
    "pg_get_viewdef",
    "pg_table_size",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_get_statisticsobjdef_columns",
    "pg_database_size",
];

/// Functions allowed only in a query the catalog instance answers: there they
/// are its stand-ins (`current_setting` answers the settings tools ask for, as
/// the PostgreSQL listener reports them, and nothing of either instance).
pub(super) const CATALOG_ONLY_FUNCTIONS: [&str; 1] = ["current_setting"];

/// Stand-ins for PostgreSQL functions DuckDB lacks, as tools use them.
const MACROS: &str = "
    CREATE MACRO pg_get_userbyid(id) AS 'milepost';
    CREATE MACRO quote_ident(name) AS name;
    CREATE MACRO array_lower(a, d) AS CASE WHEN len(a) > 0 THEN 1 END;
    CREATE MACRO array_upper(a, d) AS CASE WHEN len(a) > 0 THEN len(a) END;
    CREATE MACRO parse_ident(name) AS string_split(name, '.');
    CREATE MACRO pg_encoding_to_char(id) AS 'UTF8';
    CREATE MACRO obj_description(id, kind) AS NULL::VARCHAR;
    CREATE MACRO col_description(id, n) AS NULL::VARCHAR;
    CREATE MACRO pg_get_viewdef(id, pretty := false) AS NULL::VARCHAR;
    CREATE MACRO pg_table_size(id) AS NULL::BIGINT;
    CREATE MACRO pg_relation_size(id) AS NULL::BIGINT;
    CREATE MACRO pg_total_relation_size(id) AS NULL::BIGINT;
    CREATE MACRO pg_database_size(id) AS NULL::BIGINT;
    CREATE MACRO pg_get_statisticsobjdef_columns(id) AS NULL::VARCHAR;
    CREATE MACRO pg_relation_is_publishable(id) AS false;
    CREATE MACRO pg_get_expr(expr, relation, pretty := false) AS NULL::VARCHAR;
    CREATE MACRO pg_get_constraintdef(id, pretty := false) AS NULL::VARCHAR;
    CREATE MACRO pg_get_indexdef(id, n := 0, pretty := false) AS NULL::VARCHAR;
    CREATE MACRO pg_get_triggerdef(id, pretty := false) AS NULL::VARCHAR;
    CREATE MACRO pg_get_function_result(id) AS NULL::VARCHAR;
    CREATE MACRO pg_get_function_arguments(id) AS NULL::VARCHAR;
    CREATE MACRO pg_get_function_identity_arguments(id) AS NULL::VARCHAR;
    CREATE MACRO _pg_expandarray(a) AS
        unnest(list_transform(range(1, len(a) + 1), lambda i: {'x': a[i], 'n': i}));
";

/// A column type as PostgreSQL knows it.
struct PgType {
    /// DuckDB's name (`DECIMAL` for every precision).
    duckdb: &'static str,
    /// PostgreSQL's oid.
    oid: i64,
    /// `pg_type.typname`.
    typname: &'static str,
    /// The SQL name: `format_type`, `information_schema.columns.data_type`.
    sql: &'static str,
    /// `typlen` (-1: variable).
    len: i64,
}

const fn pg(
    duckdb: &'static str,
    oid: i64,
    typname: &'static str,
    sql: &'static str,
    len: i64,
) -> PgType {
    PgType {
        duckdb,
        oid,
        typname,
        sql,
        len,
    }
}

/// The contract's column types, by PostgreSQL's oids and names. The wire's row
/// descriptions use the same types (`pg::encode::pg_type`); anything else is
/// `text` (the last), as there. DuckDB's own `pg_attribute` gives its internal
/// type ids, which drivers (pgJDBC) read as PostgreSQL oids: `DOUBLE` came out as
/// `int4`.
const PG_TYPES: [PgType; 13] = [
    pg("BOOLEAN", 16, "bool", "boolean", 1),
    pg("BLOB", 17, "bytea", "bytea", -1),
    pg("BIGINT", 20, "int8", "bigint", 8),
    pg("SMALLINT", 21, "int2", "smallint", 2),
    pg("INTEGER", 23, "int4", "integer", 4),
    pg("VARCHAR", 1043, "varchar", "character varying", -1),
    pg("FLOAT", 700, "float4", "real", 4),
    pg("DOUBLE", 701, "float8", "double precision", 8),
    pg("DATE", 1082, "date", "date", 4),
    pg("TIME", 1083, "time", "time without time zone", 8),
    pg(
        "TIMESTAMP",
        1114,
        "timestamp",
        "timestamp without time zone",
        8,
    ),
    pg("DECIMAL", 1700, "numeric", "numeric", -1),
    pg("TEXT", 25, "text", "text", -1),
];

/// PostgreSQL's `typname` of a type as a query writes it (`DOUBLE`, `int`,
/// `varchar`, `DECIMAL`): of the contract's types by DuckDB's names and their
/// usual spellings, else the name as written, in lower case.
pub(super) fn typname(written: &str) -> String {
    let upper = written.to_ascii_uppercase();
    let duckdb = match upper.as_str() {
        "INT" | "INT4" | "SIGNED" => "INTEGER",
        "INT8" | "LONG" => "BIGINT",
        "INT2" | "SHORT" => "SMALLINT",
        "FLOAT8" | "DOUBLE PRECISION" => "DOUBLE",
        "FLOAT4" | "REAL" => "FLOAT",
        "BOOL" | "LOGICAL" => "BOOLEAN",
        "STRING" | "TEXT" | "CHAR" | "BPCHAR" => "VARCHAR",
        "NUMERIC" => "DECIMAL",
        "DATETIME" => "TIMESTAMP",
        "BYTEA" => "BLOB",
        other => other,
    };
    PG_TYPES
        .iter()
        .find(|t| t.duckdb == duckdb)
        .map_or_else(|| written.to_ascii_lowercase(), |t| t.typname.to_owned())
}

/// Macros in [`COMPAT`] that map a DuckDB type name (`data_type` of
/// `duckdb_columns()`) to a [`PgType`]'s fields, and `format_type(oid, typmod)` of
/// PostgreSQL's oids.
fn type_macros() -> String {
    let case = |field: fn(&PgType) -> String| -> String {
        let arms: String = PG_TYPES
            .iter()
            .map(|t| format!(" WHEN '{}' THEN {}", t.duckdb, field(t)))
            .collect();
        let text = field(&PG_TYPES[PG_TYPES.len() - 1]);
        format!("CASE regexp_replace(upper(t), '\\(.*', ''){arms} ELSE {text} END")
    };
    let by_oid: String = PG_TYPES
        .iter()
        .map(|t| format!(" WHEN {} THEN '{}'", t.oid, t.sql))
        .collect();
    format!(
        "CREATE MACRO {COMPAT}.type_oid(t) AS {};
         CREATE MACRO {COMPAT}.type_name(t) AS {};
         CREATE MACRO {COMPAT}.type_sql(t) AS {};
         CREATE MACRO {COMPAT}.type_len(t) AS {};
         CREATE MACRO format_type(oid, typmod) AS CASE oid{by_oid} END;",
        case(|t| t.oid.to_string()),
        case(|t| format!("'{}'", t.typname)),
        case(|t| format!("'{}'", t.sql)),
        case(|t| t.len.to_string()),
    )
}

/// The schema of the stand-in relations, hidden from the catalog they stand in
/// for (psql's lists leave out `pg_*` schemas too).
const COMPAT: &str = "pg_compat";

/// Catalog relations DuckDB lacks, or lacks columns of, as psql's `\d` and `\l`
/// and Grafana's pickers read them: made in [`COMPAT`], and references to the
/// originals rewritten to these. Those that list relations leave [`COMPAT`] out.
const SHADOWS: [(&str, &str); 21] = [
    (
        "pg_catalog.pg_proc",
        "CREATE VIEW pg_compat.pg_proc AS
             SELECT * FROM pg_catalog.pg_proc WHERE pronamespace NOT IN
                 (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname IN ('main', 'pg_compat'))",
    ),
    (
        "pg_catalog.pg_namespace",
        "CREATE VIEW pg_compat.pg_namespace AS
             SELECT * FROM pg_catalog.pg_namespace WHERE nspname <> 'pg_compat'",
    ),
    (
        "pg_catalog.pg_attribute",
        "CREATE VIEW pg_compat.pg_attribute AS
             SELECT a.* REPLACE (pg_compat.type_oid(c.data_type) AS atttypid,
                 pg_compat.type_len(c.data_type) AS attlen)
             FROM pg_catalog.pg_attribute a
             JOIN duckdb_columns() c ON c.table_oid = a.attrelid AND c.column_index = a.attnum",
    ),
    (
        "pg_catalog.pg_type",
        "CREATE VIEW pg_compat.pg_type AS
             SELECT * FROM pg_catalog.pg_type WHERE oid IS NOT NULL
             UNION ALL BY NAME
             SELECT 25 AS oid, 'text' AS typname, -1 AS typlen, 'b' AS typtype,
                 'S' AS typcategory, true AS typisdefined,
                 (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'pg_catalog')
                     AS typnamespace",
    ),
    (
        "pg_catalog.pg_settings",
        "CREATE TABLE pg_compat.pg_settings (name VARCHAR, setting VARCHAR, unit VARCHAR,
             category VARCHAR, short_desc VARCHAR, vartype VARCHAR, source VARCHAR)",
    ),
    (
        "pg_catalog.pg_class",
        "CREATE VIEW pg_compat.pg_class AS
             SELECT * REPLACE (0::BIGINT AS relam, NULL::VARCHAR[] AS reloptions),
                 false AS relforcerowsecurity
             FROM pg_catalog.pg_class
             WHERE relnamespace NOT IN
                 (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'pg_compat')",
    ),
    (
        "information_schema.tables",
        "CREATE VIEW pg_compat.tables AS
             SELECT * FROM information_schema.tables WHERE table_schema <> 'pg_compat'",
    ),
    (
        "information_schema.columns",
        "CREATE VIEW pg_compat.columns AS
             SELECT * REPLACE (pg_compat.type_sql(data_type) AS data_type,
                 pg_compat.type_name(data_type) AS udt_name)
             FROM information_schema.columns WHERE table_schema <> 'pg_compat'",
    ),
    (
        "pg_catalog.pg_database",
        "CREATE VIEW pg_compat.pg_database AS
             SELECT oid, 'milepost' AS datname, 'C' AS datcollate, 'C' AS datctype,
                 6 AS encoding, NULL::VARCHAR[] AS datacl, 'c' AS datlocprovider,
                 NULL::VARCHAR AS daticulocale, NULL::VARCHAR AS daticurules,
                 true AS datallowconn, -1 AS datconnlimit, 0 AS dattablespace,
                 10 AS datdba, false AS datistemplate
             FROM pg_catalog.pg_database WHERE datname = current_database()",
    ),
    (
        "pg_catalog.pg_inherits",
        "CREATE TABLE pg_compat.pg_inherits (inhrelid BIGINT, inhparent BIGINT,
             inhseqno INTEGER, inhdetachpending BOOLEAN)",
    ),
    (
        "pg_catalog.pg_policy",
        "CREATE TABLE pg_compat.pg_policy (oid BIGINT, polname VARCHAR, polrelid BIGINT,
             polcmd VARCHAR, polpermissive BOOLEAN, polroles BIGINT[], polqual VARCHAR,
             polwithcheck VARCHAR)",
    ),
    (
        "pg_catalog.pg_statistic_ext",
        "CREATE TABLE pg_compat.pg_statistic_ext (oid BIGINT, stxrelid BIGINT,
             stxname VARCHAR, stxnamespace BIGINT, stxowner BIGINT, stxstattarget INTEGER,
             stxkeys INTEGER[], stxkind VARCHAR[], stxexprs VARCHAR)",
    ),
    (
        "pg_catalog.pg_publication",
        "CREATE TABLE pg_compat.pg_publication (oid BIGINT, pubname VARCHAR,
             pubowner BIGINT, puballtables BOOLEAN, pubinsert BOOLEAN, pubupdate BOOLEAN,
             pubdelete BOOLEAN, pubtruncate BOOLEAN, pubviaroot BOOLEAN)",
    ),
    (
        "pg_catalog.pg_publication_rel",
        "CREATE TABLE pg_compat.pg_publication_rel (oid BIGINT, prpubid BIGINT,
             prrelid BIGINT, prqual VARCHAR, prattrs INTEGER[])",
    ),
    (
        "pg_catalog.pg_publication_namespace",
        "CREATE TABLE pg_compat.pg_publication_namespace (oid BIGINT, pnpubid BIGINT,
             pnnspid BIGINT)",
    ),
    (
        "pg_catalog.pg_trigger",
        "CREATE TABLE pg_compat.pg_trigger (oid BIGINT, tgrelid BIGINT, tgparentid BIGINT,
             tgname VARCHAR, tgenabled VARCHAR, tgisinternal BOOLEAN)",
    ),
    (
        "pg_catalog.pg_roles",
        "CREATE VIEW pg_compat.pg_roles AS SELECT 10::BIGINT AS oid, 'milepost' AS rolname,
             false AS rolsuper, false AS rolcanlogin",
    ),
    (
        "pg_catalog.pg_collation",
        "CREATE TABLE pg_compat.pg_collation (oid BIGINT, collname VARCHAR,
             collnamespace BIGINT)",
    ),
    (
        "pg_catalog.pg_rewrite",
        "CREATE TABLE pg_compat.pg_rewrite (oid BIGINT, rulename VARCHAR, ev_class BIGINT,
             ev_type VARCHAR, ev_enabled VARCHAR, is_instead BOOLEAN)",
    ),
    (
        "pg_catalog.pg_foreign_table",
        "CREATE TABLE pg_compat.pg_foreign_table (ftrelid BIGINT, ftserver BIGINT,
             ftoptions VARCHAR[])",
    ),
    (
        "pg_catalog.pg_partitioned_table",
        "CREATE TABLE pg_compat.pg_partitioned_table (partrelid BIGINT, partstrat VARCHAR)",
    ),
];

/// `current_setting(name)`: the settings the PostgreSQL listener reports
/// ([`super::SETTINGS`]), and nothing of either DuckDB instance.
fn current_setting() -> String {
    let cases: String = super::SETTINGS
        .iter()
        .map(|(name, value)| format!(" WHEN '{name}' THEN '{value}'"))
        .collect();
    format!("CREATE MACRO current_setting(name) AS CASE lower(name){cases} END;")
}

/// PostgreSQL-only syntax rewritten to DuckDB's, everywhere in a query (these
/// forms do not occur elsewhere): `c.relname OPERATOR(pg_catalog.~) '^(x)$'
/// COLLATE pg_catalog.default`, as psql's `\d` writes it.
static SYNTAX: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    rules(&[
        (
            r"(?i)OPERATOR\s*\(\s*pg_catalog\s*\.\s*([~!=<>*+-]+)\s*\)",
            " $1 ",
        ),
        (r#"(?i)COLLATE\s+pg_catalog\s*\.\s*"?default"?"#, ""),
    ])
});

/// Rewrites of a query the catalog instance answers.
static CATALOG: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    let shadows: Vec<String> = SHADOWS
        .iter()
        .map(|(name, _)| name.split('.').nth(1).unwrap_or(name).to_owned())
        .collect();
    let shadows = format!(
        r"(?i)\b(?:pg_catalog|information_schema)\s*\.\s*({})\b",
        shadows.join("|")
    );
    rules(&[
        // Functions by their bare names: DuckDB keeps some PostgreSQL ones outside
        // its `pg_catalog` (`array_to_string`), and the stand-ins live in `main`
        // (DuckDB lets nothing be created in its `pg_catalog`).
        (
            r"(?i)\b(?:pg_catalog|information_schema)\s*\.\s*([a-z_][a-z0-9_]*)\s*\(",
            "$1(",
        ),
        (&shadows, "pg_compat.$1"),
        // `'readings'::regclass`: the relation's oid (pgJDBC's metadata joins
        // `pg_description` on `'pg_class'::regclass`, which has none here).
        (
            r"(?i)'(?:[a-z_][a-z0-9_]*\.)?([a-z_][a-z0-9_]*)'\s*::\s*(?:pg_catalog\s*\.\s*)?regclass\b",
            "(SELECT min(oid) FROM pg_compat.pg_class WHERE relname = '$1')",
        ),
        // `'pg_catalog.array_in'::regproc` and the like: no such objects here.
        (
            r"(?i)'[^']*'\s*::\s*(?:pg_catalog\s*\.\s*)?reg[a-z]+\b",
            "NULL::BIGINT",
        ),
        // `::pg_catalog.regclass`, `::regtype`: DuckDB's oids are BIGINTs.
        (r"(?i)::\s*(?:pg_catalog\s*\.\s*)?reg[a-z]+\b", "::BIGINT"),
        (r"(?i)::\s*pg_catalog\s*\.\s*", "::"),
        // Grafana's schema constraint reads the search path with two functions in
        // FROM, which PostgreSQL turns into relations and DuckDB does not:
        // `generate_series(…) as i, string_to_array(current_setting('search_path'),',') s`.
        (
            r"(?i)\)\s+as\s+i\s*,\s*string_to_array\s*\(\s*current_setting\s*\(\s*'search_path'\s*\)\s*,\s*','\s*\)\s+s\b",
            ") AS _i(i), (SELECT string_to_array(current_setting('search_path'), ',') AS s) s",
        ),
    ])
});

fn rules(rules: &[(&str, &'static str)]) -> Vec<(Regex, &'static str)> {
    rules
        .iter()
        .map(|(pattern, to)| (Regex::new(pattern).expect("catalog rewrite"), *to))
        .collect()
}

fn rewrite<'a>(sql: &'a str, rules: &[(Regex, &'static str)]) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(sql);
    for (pattern, to) in rules {
        if let Cow::Owned(s) = pattern.replace_all(&out, *to) {
            out = Cow::Owned(s);
        }
    }
    out
}

/// `sql` with PostgreSQL-only syntax in DuckDB's spelling.
pub(super) fn compatible(sql: &str) -> Cow<'_, str> {
    rewrite(sql, &SYNTAX)
}

/// `sql` (checked, routed to the catalog) as the catalog instance runs it.
pub(super) fn for_catalog(sql: &str) -> Cow<'_, str> {
    rewrite(sql, &CATALOG)
}

/// `CREATE TABLE` statements for the contract's relations, empty, with the
/// columns and types of the views on `views` (a connection where they exist).
pub(super) fn relation_tables(views: &Connection) -> Result<String, StoreError> {
    let mut tables = String::new();
    for relation in RELATIONS {
        let mut stmt = views.prepare(&format!("DESCRIBE {relation}"))?;
        let columns = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let columns: Vec<String> = columns
            .iter()
            .map(|(name, ty)| format!("\"{name}\" {ty}"))
            .collect();
        tables += &format!("CREATE TABLE {relation} ({});\n", columns.join(", "));
    }
    Ok(tables)
}

/// The in-memory instance and its idle connections.
pub(super) struct Catalog {
    /// Connections to the in-memory instance.
    pub(super) pool: Pool,
}

impl Catalog {
    /// Builds the instance with `tables`, the contract's relations
    /// ([`relation_tables`]).
    pub(super) fn new(tables: &str) -> Result<Self, StoreError> {
        let config = Config::default()
            .max_memory("64MB")
            .and_then(|c| c.threads(1))
            .and_then(|c| c.enable_external_access(false))
            .and_then(|c| c.with("autoinstall_known_extensions", "false"))
            .and_then(|c| c.with("autoload_known_extensions", "false"))
            .and_then(|c| c.with("allow_community_extensions", "false"))
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let base = Connection::open_in_memory_with_flags(config)?;
        base.execute_batch(tables)?;
        base.execute_batch(MACROS)?;
        base.execute_batch(&current_setting())?;
        base.execute_batch(&format!("CREATE SCHEMA {COMPAT}"))?;
        base.execute_batch(&type_macros())?;
        for (_, create) in SHADOWS {
            base.execute_batch(create)?;
        }
        let settings: Vec<String> = super::SETTINGS
            .iter()
            .map(|(name, value)| format!("('{name}', '{value}', 'string', 'default')"))
            .collect();
        base.execute_batch(&format!(
            "INSERT INTO {COMPAT}.pg_settings (name, setting, vartype, source) VALUES {}",
            settings.join(", ")
        ))?;
        base.execute_batch("SET lock_configuration = true")?;
        Ok(Self {
            pool: Pool::new(base, 8),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psql_forms_are_rewritten_and_the_rest_left_alone() {
        assert_eq!(
            compatible(
                "WHERE c.relname OPERATOR(pg_catalog.~) '^(readings)$' COLLATE pg_catalog.default"
            ),
            "WHERE c.relname  ~  '^(readings)$' "
        );
        assert_eq!(
            for_catalog(
                "SELECT pg_catalog.pg_get_userbyid(c.relowner), c.oid::pg_catalog.regclass::pg_catalog.text \
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON true"
            ),
            "SELECT pg_get_userbyid(c.relowner), c.oid::BIGINT::text \
             FROM pg_compat.pg_class c JOIN pg_compat.pg_namespace n ON true"
        );
        // pgJDBC's literal casts, and a function of `information_schema`.
        assert_eq!(
            for_catalog(
                "d.classoid = 'pg_catalog.pg_class'::regclass AND t.typinput = 'array_in'::regproc \
                 AND information_schema._pg_expandarray(i.indkey)"
            ),
            "d.classoid = (SELECT min(oid) FROM pg_compat.pg_class WHERE relname = 'pg_class') \
             AND t.typinput = NULL::BIGINT AND _pg_expandarray(i.indkey)"
        );
        let plain = "SELECT avg(value) FROM readings";
        assert!(matches!(compatible(plain), Cow::Borrowed(s) if s == plain));
    }
}

// Milepost's PostgreSQL listener through pgJDBC, the driver of the JVM's BI tools
// (Metabase, DBeaver, Tableau's and many others' PostgreSQL connectors).
//
// Usage: java -cp postgresql.jar PgJdbc.java HOST PORT TOKEN [CA_FILE]
//
// With CA_FILE the connection uses TLS and verifies the server's certificate
// (sslmode=verify-full). Asserts what the driver must see: the schema browser's
// metadata calls (schemas, tables, columns with their JDBC types, keys and
// indexes), every mapped type, server-side prepared statements past the driver's
// prepareThreshold, a cursor read in pieces (fetch size) and a capped result (max
// rows), a query timeout (a cancel request), errors with their SQLSTATE, and the
// schema-qualified SQL such tools generate. Prints, one JSON object a line, the
// hourly averages and raw rows per device the Rust test compares with Milepost's
// HTTP API, then {"check":"done"}.

import java.math.BigDecimal;
import java.sql.*;
import java.time.LocalDateTime;
import java.time.format.DateTimeFormatter;
import java.util.*;

public class PgJdbc {
    static final String[] DEVICES = {"car-a", "car-b"};
    static final String BOMB =
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t";
    static final DateTimeFormatter SECOND = DateTimeFormatter.ofPattern("yyyy-MM-dd'T'HH:mm:ss'Z'");
    static final DateTimeFormatter MICRO =
        DateTimeFormatter.ofPattern("yyyy-MM-dd'T'HH:mm:ss.SSSSSS'Z'");

    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    static void equal(Object got, Object want, String what) {
        if (!Objects.equals(got, want)) throw new AssertionError(what + ": got " + got + ", want " + want);
    }

    /** The SQLSTATE `sql` fails with. */
    static String failure(Connection c, String sql) {
        try (Statement s = c.createStatement()) {
            s.executeQuery(sql).close();
        } catch (SQLException e) {
            return e.getSQLState();
        }
        throw new AssertionError(sql + ": no error");
    }

    static List<String> column(ResultSet rs, String name) throws SQLException {
        List<String> out = new ArrayList<>();
        while (rs.next()) out.add(rs.getString(name));
        rs.close();
        return out;
    }

    public static void main(String[] args) throws Exception {
        String host = args[0], port = args[1], token = args[2];
        String tls = args.length > 3 ? "sslmode=verify-full&sslrootcert=" + args[3] : "sslmode=disable";
        String url = "jdbc:postgresql://" + host + ":" + port + "/milepost?" + tls;

        // A wrong token is refused as a wrong password.
        try {
            DriverManager.getConnection(url, "analyst", "mpt_wrong").close();
            throw new AssertionError("a wrong token was let in");
        } catch (SQLException e) {
            equal(e.getSQLState(), "28P01", "wrong token");
        }

        try (Connection c = DriverManager.getConnection(url, "analyst", token)) {
            metadata(c);
            types(c);
            prepared(c);
            cursors(c);
            errors(c);
        }
        System.out.println("{\"check\":\"done\"}");
    }

    /** What a schema browser (DBeaver) or a BI tool's sync (Metabase) reads. */
    static void metadata(Connection c) throws SQLException {
        DatabaseMetaData md = c.getMetaData();
        equal(md.getDatabaseMajorVersion(), 16, "server version");
        equal(column(md.getSchemas(), "TABLE_SCHEM"), List.of("main"), "schemas");
        equal(column(md.getCatalogs(), "TABLE_CAT"), List.of("milepost"), "catalogs");
        equal(
            column(md.getTables(null, null, "%", new String[] {"TABLE", "VIEW"}), "TABLE_NAME"),
            List.of("anomalies", "devices", "dumps", "readings", "rollups_15m", "sensors"),
            "tables");
        Map<String, Integer> readings = new LinkedHashMap<>();
        try (ResultSet rs = md.getColumns(null, "main", "readings", "%")) {
            while (rs.next()) readings.put(rs.getString("COLUMN_NAME"), rs.getInt("DATA_TYPE"));
        }
        Map<String, Integer> want = new LinkedHashMap<>();
        want.put("device", Types.VARCHAR);
        want.put("sensor", Types.VARCHAR);
        want.put("ts", Types.TIMESTAMP);
        want.put("value", Types.DOUBLE);
        equal(readings, want, "columns of readings");
        Map<String, String> types = new HashMap<>();
        try (ResultSet rs = md.getColumns(null, null, "%", "%")) {
            while (rs.next())
                types.put(rs.getString("TABLE_NAME") + "." + rs.getString("COLUMN_NAME"),
                    rs.getString("TYPE_NAME"));
        }
        equal(types.get("rollups_15m.count"), "int8", "rollups_15m.count");
        equal(types.get("anomalies.before_mean"), "float8", "anomalies.before_mean");
        equal(types.get("dumps.day"), "date", "dumps.day");
        // No keys or indexes, answered rather than failed.
        check(!md.getPrimaryKeys(null, "main", "readings").next(), "primary keys");
        check(!md.getImportedKeys(null, "main", "readings").next(), "foreign keys");
        check(!md.getIndexInfo(null, "main", "readings", false, true).next(), "indexes");
        equal(c.getSchema(), "main", "current schema");
        equal(c.getTransactionIsolation(), Connection.TRANSACTION_READ_COMMITTED, "isolation");
        c.setReadOnly(true);
        check(c.isValid(5), "isValid");
    }

    /** Every mapped type, and NULL. */
    static void types(Connection c) throws SQLException {
        try (Statement s = c.createStatement();
             ResultSet rs = s.executeQuery(
                 "SELECT TIMESTAMP '2026-03-01 10:07:00.123456' AS ts, 1.5::DOUBLE AS d, "
                     + "42::BIGINT AS b, 7::INTEGER AS i, 3::SMALLINT AS s, 'x'::VARCHAR AS v, "
                     + "true AS t, NULL::DOUBLE AS n, DATE '2026-03-01' AS day, "
                     + "12.25::DECIMAL(10, 2) AS m")) {
            check(rs.next(), "a row");
            equal(rs.getObject("ts", LocalDateTime.class), LocalDateTime.of(2026, 3, 1, 10, 7, 0, 123456000), "ts");
            equal(rs.getDouble("d"), 1.5, "double");
            equal(rs.getLong("b"), 42L, "bigint");
            equal(rs.getInt("i"), 7, "integer");
            equal(rs.getShort("s"), (short) 3, "smallint");
            equal(rs.getString("v"), "x", "varchar");
            equal(rs.getBoolean("t"), true, "boolean");
            rs.getDouble("n");
            check(rs.wasNull(), "NULL");
            equal(rs.getDate("day"), java.sql.Date.valueOf("2026-03-01"), "date");
            equal(rs.getBigDecimal("m"), new BigDecimal("12.25"), "numeric");
            ResultSetMetaData meta = rs.getMetaData();
            equal(meta.getColumnType(1), Types.TIMESTAMP, "ts type");
            equal(meta.getColumnType(2), Types.DOUBLE, "double type");
            equal(meta.getColumnType(3), Types.BIGINT, "bigint type");
            check(!rs.next(), "one row");
        }
    }

    /**
     * Hourly averages per device with parameters, run past the driver's
     * prepareThreshold (5): from then on a named server-side statement, binary results.
     */
    static void prepared(Connection c) throws SQLException {
        String sql = "SELECT date_trunc('hour', ts) AS hour, count(*) AS n, avg(value) AS mean "
            + "FROM readings WHERE device = ? AND sensor = 'speed' AND ts >= ? AND ts < ? "
            + "GROUP BY 1 ORDER BY 1";
        try (PreparedStatement p = c.prepareStatement(sql)) {
            Map<String, String> first = new HashMap<>();
            for (int run = 0; run < 4; run++) {
                for (String device : DEVICES) {
                    p.setString(1, device);
                    p.setTimestamp(2, Timestamp.valueOf("2026-03-01 00:00:00"));
                    p.setTimestamp(3, Timestamp.valueOf("2026-03-02 00:00:00"));
                    StringBuilder rows = new StringBuilder();
                    try (ResultSet rs = p.executeQuery()) {
                        while (rs.next()) {
                            if (rows.length() > 0) rows.append(',');
                            rows.append("[\"").append(rs.getObject(1, LocalDateTime.class).format(SECOND))
                                .append("\",").append(rs.getLong(2)).append(',').append(rs.getDouble(3)).append(']');
                        }
                    }
                    // The eighth run answers what the first did.
                    String answer = rows.toString();
                    if (run == 0) first.put(device, answer);
                    else equal(answer, first.get(device), "run " + run + " of " + device);
                    if (run == 3)
                        System.out.println("{\"check\":\"hourly\",\"device\":\"" + device + "\",\"rows\":[" + answer + "]}");
                }
            }
        }
    }

    /** A cursor read five rows at a time, a result capped by max rows, a timeout. */
    static void cursors(Connection c) throws SQLException {
        c.setAutoCommit(false);
        for (String device : DEVICES) {
            try (PreparedStatement p = c.prepareStatement(
                     "SELECT ts, value FROM readings WHERE device = ? AND sensor = 'speed' ORDER BY ts")) {
                p.setFetchSize(5);
                p.setString(1, device);
                StringBuilder rows = new StringBuilder();
                int n = 0;
                try (ResultSet rs = p.executeQuery()) {
                    while (rs.next()) {
                        if (n++ > 0) rows.append(',');
                        rows.append("[\"").append(rs.getObject(1, LocalDateTime.class).format(MICRO))
                            .append("\",").append(rs.getDouble(2)).append(']');
                    }
                }
                check(n > 10, "more rows than one fetch");
                System.out.println("{\"check\":\"raw\",\"device\":\"" + device + "\",\"rows\":[" + rows + "]}");
            }
        }
        c.commit();
        c.setAutoCommit(true);
        // DBeaver's "first 200 rows", schema-qualified as tools write it.
        try (Statement s = c.createStatement()) {
            s.setMaxRows(3);
            int n = 0;
            try (ResultSet rs = s.executeQuery("SELECT * FROM main.readings ORDER BY ts")) {
                while (rs.next()) n++;
            }
            equal(n, 3, "max rows");
        }
        // Metabase's generated SQL: every name quoted and qualified.
        try (Statement s = c.createStatement();
             ResultSet rs = s.executeQuery(
                 "SELECT \"main\".\"readings\".\"device\" AS \"device\", count(*) AS \"count\" "
                     + "FROM \"main\".\"readings\" GROUP BY \"main\".\"readings\".\"device\" "
                     + "ORDER BY \"main\".\"readings\".\"device\" ASC")) {
            List<String> devices = new ArrayList<>();
            while (rs.next()) devices.add(rs.getString("device"));
            equal(devices, List.of(DEVICES), "devices by Metabase's query");
        }
        // setQueryTimeout sends a cancel request; the connection goes on.
        try (Statement s = c.createStatement()) {
            s.setQueryTimeout(1);
            long started = System.nanoTime();
            try {
                s.executeQuery(BOMB);
                throw new AssertionError("the bomb finished");
            } catch (SQLException e) {
                equal(e.getSQLState(), "57014", "query timeout");
            }
            check(System.nanoTime() - started < 10_000_000_000L, "stopped in time");
        }
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 1")) {
            check(rs.next() && rs.getInt(1) == 1, "after the timeout");
        }
    }

    /** Errors carry their SQLSTATE, and the connection goes on. */
    static void errors(Connection c) throws SQLException {
        equal(failure(c, "SELEC 1"), "42601", "syntax error");
        equal(failure(c, "DELETE FROM readings"), "42501", "DELETE");
        equal(failure(c, "SELECT * FROM main.series"), "42501", "an internal table");
        equal(failure(c, "SELECT * FROM read_csv('/etc/passwd')"), "42501", "a file");
        equal(failure(c, "SELECT 'a'::INTEGER"), "22P02", "a bad cast");
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 2")) {
            check(rs.next() && rs.getInt(1) == 2, "after the errors");
        }
    }
}

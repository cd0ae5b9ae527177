"""Reads a Milepost Parquet lake (a local directory) with the engines a user would
point at it, each the documented way, and prints one JSON object per engine:

    {"engine": "polars", "columns": {"node": "...", ...}, "counts": {"n1/2026-12-02": 123, ...},
     "distinct_keys": 456}

`counts` are readings per node and Hive `date` partition; `distinct_keys` counts
(device, sensor, timestamp) once however many nodes hold a reading (the
deduplication docs/dumps.md shows). Used by tests/api/lake.rs.

usage: lake_readers.py LAKE_DIR ENGINE...   (ENGINE: pyarrow, polars, spark)
"""

import json
import os
import sys


def pyarrow_counts(lake):
    import pyarrow.dataset as ds

    dataset = ds.dataset(os.path.join(lake, "parquet"), format="parquet", partitioning="hive")
    table = dataset.to_table()
    grouped = table.group_by(["node", "date"]).aggregate([("value", "count")])
    counts = {
        f"{n}/{d}": c
        for n, d, c in zip(
            grouped["node"].to_pylist(),
            grouped["date"].to_pylist(),
            grouped["value_count"].to_pylist(),
        )
    }
    keys = table.select(["device", "sensor", "timestamp"]).group_by(
        ["device", "sensor", "timestamp"]
    ).aggregate([])
    columns = {f.name: str(f.type) for f in table.schema}
    return columns, counts, keys.num_rows


def polars_counts(lake):
    import polars as pl

    lf = pl.scan_parquet(
        os.path.join(lake, "parquet", "*", "*.parquet"), hive_partitioning=True
    )
    columns = {name: str(dtype) for name, dtype in lf.collect_schema().items()}
    grouped = lf.group_by(["node", "date"]).agg(pl.len().alias("n")).collect()
    counts = {f"{r['node']}/{r['date']}": r["n"] for r in grouped.iter_rows(named=True)}
    distinct = (
        lf.unique(subset=["device", "sensor", "timestamp"]).select(pl.len()).collect().item()
    )
    return columns, counts, distinct


def spark_counts(lake):
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("milepost-lake")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        df = spark.read.parquet(os.path.join(lake, "parquet"))
        columns = {f.name: f.dataType.simpleString() for f in df.schema.fields}
        counts = {
            f"{r['node']}/{r['date']}": r["count"]
            for r in df.groupBy("node", "date").count().collect()
        }
        distinct = df.dropDuplicates(["device", "sensor", "timestamp"]).count()
        return columns, counts, distinct
    finally:
        spark.stop()


ENGINES = {"pyarrow": pyarrow_counts, "polars": polars_counts, "spark": spark_counts}


def main():
    lake, engines = sys.argv[1], sys.argv[2:]
    for engine in engines:
        columns, counts, distinct = ENGINES[engine](lake)
        print(
            json.dumps(
                {
                    "engine": engine,
                    "columns": columns,
                    "counts": {k: int(v) for k, v in counts.items()},
                    "distinct_keys": int(distinct),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

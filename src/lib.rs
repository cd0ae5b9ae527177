//! # Milepost
//!
//! One binary that ingests NDJSON sensor readings into an embedded DuckDB file and
//! serves them over an OpenAPI-documented HTTP API, wire-compatible with the
//! cloud-lada devices and dashboard; it detects steps in the series and publishes
//! every day to a Parquet / NDJSON lake.
//!
//! # Layout
//!
//! ```text
//! device ──POST /ingest──▶ api::ingest ──▶ ingest (bytes → Batch + line errors; pure)
//!                              │
//!                              ▼
//!                  store::Writer: the front thread takes whatever is queued as one
//!                  group (bounded queue → 503) and acknowledges it once durable:
//!                    groups whose readings memory decides new (live, re-sent,
//!                    replayed, bulk imports) ──▶ store::ingest_log (written; the
//!                              syncer thread's fdatasync acknowledges them)
//!                              ──▶ the flusher thread moves segments into DuckDB
//!                                  (the next one sorted meanwhile on milepost-prep)
//!                    everything else ───▶ DuckDB directly (Arrow inserts, exact dedupe
//!                                          without an index, 15-minute rollups)
//!                              │
//!                              ▼
//!                     DuckDB file ◀── store::Reader (own connections; adds what the
//!                              ▲       log acknowledged and DuckDB lacks, takes live
//!                              │       quarter hours from store::live) ◀── api
//!                              │
//!   jobs (cron, compaction) ──▶ export::Dumper ──▶ store::DumpSource (own connection)
//!                              └──▶ object_store: per-node keys and manifests
//!                                   (export::lake: whose a key is)
//!
//! writer ──series it committed──▶ jobs::detection ──▶ detect (pure step fit)
//!                                        │
//!                                        ▼
//!                        store::AlertStore (own connection) ──▶ jobs::notify (webhooks)
//!                                        ▲
//! operator ──gRPC, bearer token──▶ backend (authz ▶ services) ──▶ Redump, DryRun, Backfill
//! analyst ──POST /api/v1/sql, bearer token──▶ api::sql ─┐
//! psql, Grafana ──PostgreSQL protocol, token──▶ pg ─────┴▶ store::sql (sandbox checks,
//!                          contract views, own connections, limits; pg_catalog and
//!                          information_schema from an in-memory catalog instance)
//! ```
//!
//! - [`domain`]: types that are valid by construction (`Device`, `Reading` rows,
//!   `Timestamp`, `Day`, the sensor `Catalog`, step configurations, alerts, dumps),
//!   and the one name table per named enum.
//! - [`ingest`]: pure, synchronous NDJSON parsing with per-line errors; it asks a
//!   `DeviceGate` (the API's `api::admission`: `--max-devices`, new devices per key)
//!   before storing readings of a device new to the request.
//! - [`store`]: everything that speaks SQL to the database and owns the data
//!   directory — migrations, the writer (front, syncer, flusher and their ingest log), the
//!   reader, rollups, compaction, retention, deleting a device (`store::forget`),
//!   dumps' day files, alerts' tables, users' sandboxed SQL (`store::sql`), and
//!   `store::diagnostics` (does the database open; the benchmark's native references)
//!   for `cli::recover` and `bench`, which get typed answers, never a connection.
//! - [`export`]: daily dumps to a blob store, which days are due, and the lake's
//!   rules when several appliances share it (`export::lake`).
//! - [`detect`]: step detection math (SPEC 5), pure: bucket means in, steps out.
//! - [`jobs`]: what runs in the background — the dump schedule and retention,
//!   periodic compaction, detection after commits, webhooks.
//! - [`api`]: the public HTTP API (poem-openapi on a hyper listener); thin, errors
//!   map to JSON in one place. `api::chart` draws charts as SVG (plotters);
//!   `api::console` is the built-in HTML console (maud) over the same reads.
//! - [`backend`]: the internal gRPC listener (tonic) — services, each with its
//!   authorization policy, hashed tokens, reflection, and its command-line client.
//! - [`pg`]: the PostgreSQL wire listener for users' SQL (pgwire): token
//!   passwords, TLS off loopback, cancel requests, session statements.
//! - [`tls`]: the listeners' certificate (rustls), reloaded on SIGHUP.
//! - [`metrics`], [`background`]: the Prometheus registry; low-priority threads.
//! - [`config`]: the server's settings (flags with `MILEPOST_*` fallbacks and a
//!   `milepost.toml` file under both, `config::file`).
//! - [`app`]: start-up in steps and the one ordered shutdown.
//! - [`bench`]: `milepost bench`. [`demo`]: `milepost demo`, simulated cars through
//!   a real server. [`push`]: `milepost push`, the device side of the
//!   offline buffer (an HTTP client of `/ingest`). [`cli`]: the command line and its
//!   subcommands.
//!
//! # Layers
//!
//! A module may use (`crate::…`) only modules of a lower layer; one layer's modules
//! do not use each other. `metrics` and `background` are leaves anyone may use.
//! The test `layering` reads this block and checks every file against it.
//!
//! ```text
//! 10 cli
//! 9  bench
//! 8  demo
//! 7  app push
//! 6  config
//! 5  api backend pg
//! 4  jobs
//! 3  export
//! 2  store
//! 1  detect ingest
//! 0  domain metrics background tls
//! ```

pub mod api;
pub mod app;
pub mod backend;
pub mod background;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod detect;
pub mod domain;
pub mod export;
pub mod ingest;
pub mod jobs;
pub mod metrics;
pub mod pg;
pub mod push;
pub mod store;
pub mod tls;

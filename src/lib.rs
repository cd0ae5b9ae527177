//! # Milepost
//!
//! One binary that ingests NDJSON sensor readings into an embedded DuckDB file and
//! serves them over an OpenAPI-documented HTTP API, wire-compatible with the
//! cloud-lada devices and dashboard.
//!
//! # Layout
//!
//! ```text
//! device ──POST /ingest──▶ api::ingest ──▶ ingest::ndjson (bytes → Batch + line errors)
//!                              │
//!                              ▼
//!                        store::Writer  (one thread owns the write connection;
//!                              │         bounded queue → 503; Appender; group commit;
//!                              ▼         exact dedupe without an index)
//!                     DuckDB file  ◀── store::Reader (own connections) ◀── api::seed, api::v1
//!                              ▲
//!   jobs (cron) ──▶ export::Dumper ──▶ store::DumpSource (own connection, Arrow batches)
//!                              └──▶ object_store (file, S3, GCS, Azure): per-node keys,
//!                                   manifests/<node>.json (export::lake: who owns a key)
//!
//! writer ──series it committed──▶ jobs::detection ──▶ detect (pure step fit)
//!                                        │                 over Reader's bucket means
//!                                        ▼
//!                        store::AlertStore (own connection) ──▶ jobs::notify (webhooks)
//!                                        ▲
//! operator ──gRPC, bearer token──▶ backend (authz ▶ services) ──▶ Redump, DryRun, Backfill
//! ```
//!
//! - [`domain`]: types that are valid by construction (`Device`, `Reading` rows,
//!   `Timestamp`, `Day`, the sensor `Catalog`).
//! - [`ingest`]: pure, synchronous NDJSON parsing with per-line errors.
//! - [`store`]: the only module that speaks SQL — migrations, the writer, the reader,
//!   15-minute rollups for long-range statistics, compaction of finished days.
//! - [`api`]: poem-openapi handlers; thin, and errors map to JSON in one place. The
//!   seed's endpoints in `api::seed`, the richer `/api/v1` reads in `api::v1`
//!   (statistics buckets, streamed exports, GPS track).
//! - [`export`]: daily dumps (gzip NDJSON and a Hive-partitioned Parquet lake) to a
//!   blob store, the manifest, which days are due.
//! - [`detect`]: step detection math (SPEC 5), pure: bucket means in, steps out.
//! - [`jobs`]: the dump schedule (tokio-cron-scheduler) and retention after it;
//!   background step detection after commits and the webhooks of what it finds.
//! - [`backend`]: the internal gRPC listener (poem-grpc) — services, each with its
//!   authorization policy, hashed tokens, reflection, and its command-line client.
//! - [`metrics`]: the Prometheus registry behind `GET /metrics`.
//! - [`background`]: low-priority threads for dumps and detection.
//! - [`app`]: wiring and the ordered graceful shutdown.
//! - [`config`] and [`cli`]: flags with `MILEPOST_*` environment fallbacks, logging.
//! - [`bench`]: `milepost bench`, ingest and query speed against DuckDB's own limit.

pub mod api;
pub mod app;
pub mod backend;
pub mod background;
pub mod bench;
pub mod cli;
pub mod config;
pub mod detect;
pub mod domain;
pub mod export;
pub mod ingest;
pub mod jobs;
pub mod metrics;
pub mod store;

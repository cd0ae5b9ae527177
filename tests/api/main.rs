//! Black-box tests: the real server on 127.0.0.1:0, a real DuckDB file in a temp
//! directory, real HTTP. One test binary (modules below) to keep link time down.

mod backend;
mod charts;
mod clients;
mod compaction;
mod config;
mod console;
mod crash;
mod dashboard;
mod demo;
mod devices;
mod disk;
mod dumps;
mod fleet;
mod helpers;
mod hostile;
mod ingest;
mod lake;
mod layering;
mod lifecycle;
mod metrics;
mod openapi;
mod pg;
mod push;
mod reads;
mod reload;
mod s3;
mod series;
mod sql;
mod tools;
mod v1;

//! Code generated from `schema/proto/backend.proto` at build time (see `build.rs`),
//! with each service's server, trait and client re-exported here, flat.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("milepost.backend.v1");

pub use alerts_client::AlertsClient;
pub use alerts_server::{Alerts, AlertsServer};
pub use anomalies_client::AnomaliesClient;
pub use anomalies_server::{Anomalies, AnomaliesServer};
pub use detection_client::DetectionClient;
pub use detection_server::{Detection, DetectionServer};
pub use devices_client::DevicesClient;
pub use devices_server::{Devices, DevicesServer};
pub use hello_client::HelloClient;
pub use hello_server::{Hello, HelloServer};
pub use jobs_client::JobsClient;
pub use jobs_server::{Jobs, JobsServer};
pub use sensor_catalog_client::SensorCatalogClient;
pub use sensor_catalog_server::{SensorCatalog, SensorCatalogServer};

/// The encoded descriptor set that server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("backend_descriptor");

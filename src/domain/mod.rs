//! Domain types. Each one is parsed once, at the edge, and is valid by construction:
//! a [`Reading`] that exists has a catalogued sensor, a finite in-range value, a sane
//! timestamp and a well-formed device name.

mod alert;
mod buckets;
mod device;
mod dump;
mod names;
mod reading;
mod sensor;
mod step;
mod time;

pub use alert::{
    Alert, AlertSpec, AlertSpecError, Anomaly, AnomalyFilter, AnomalyGroup, Delivery, FoundStep,
    GroupAction, TriageStatus,
};
pub use buckets::{Aggregate, BucketError, BucketWidth, Buckets, RangeError, TimeRange};
pub use device::{Device, DeviceError, DeviceId};
pub use dump::{DumpFormat, NodeIdentity};
pub use names::UnknownName;
pub use reading::{Batch, Row};
pub use sensor::{Catalog, Sensor, SensorId, SensorName, SensorNameError, ValueError};
pub use step::{Algorithm, ConfigError, Direction, Step, StepConfig};
pub use time::{Day, DayError, Timestamp, TimestampError, TzError, parse_tz};

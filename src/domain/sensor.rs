use rustc_hash::FxHashMap;
use std::fmt;

/// Small integer the store uses for a sensor in place of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SensorId(pub u16);

/// Name of a sensor: `[a-z0-9_]{1,64}`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SensorName(String);

/// Why a sensor name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sensor names are 1 to 64 of a-z, 0-9 and '_', starting with a letter")]
pub struct SensorNameError;

impl SensorName {
    /// Parses a sensor name.
    pub fn parse(s: &str) -> Result<Self, SensorNameError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_lowercase()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(SensorNameError)
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a value was refused for a sensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// NaN or infinite.
    #[error("value must be a finite number")]
    NotFinite,
    /// Outside the sensor's valid range.
    #[error("value {value} is outside the valid range {min}..{max} of sensor '{sensor}'")]
    OutOfRange {
        /// The sensor.
        sensor: String,
        /// The value sent.
        value: f64,
        /// Lowest valid value.
        min: f64,
        /// Highest valid value.
        max: f64,
    },
}

/// One entry of the sensor catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Sensor {
    /// Store id.
    pub id: SensorId,
    /// Name readings use.
    pub name: SensorName,
    /// Unit of its values, e.g. `km/h`.
    pub unit: String,
    /// Free text for people.
    pub description: String,
    /// Lowest valid value, if bounded.
    pub min: Option<f64>,
    /// Highest valid value, if bounded.
    pub max: Option<f64>,
}

impl Sensor {
    /// Checks that `value` is finite and within this sensor's range.
    pub fn check_value(&self, value: f64) -> Result<f64, ValueError> {
        if !value.is_finite() {
            return Err(ValueError::NotFinite);
        }
        let min = self.min.unwrap_or(f64::NEG_INFINITY);
        let max = self.max.unwrap_or(f64::INFINITY);
        if value < min || value > max {
            return Err(ValueError::OutOfRange {
                sensor: self.name.to_string(),
                value,
                min,
                max,
            });
        }
        Ok(value)
    }
}

/// The sensors readings may name. Cheap to clone behind an `Arc`; replaced whole when
/// an operator changes it.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    sensors: Vec<Sensor>,
    /// FxHash: looked up once per ingested line, and SipHash showed in profiles. The
    /// map is fixed when built, so client-chosen names cannot degrade it.
    by_name: FxHashMap<String, usize>,
}

impl Catalog {
    /// Builds a catalog from its entries.
    pub fn new(mut sensors: Vec<Sensor>) -> Self {
        sensors.sort_by_key(|s| s.id);
        let by_name = sensors
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str().to_owned(), i))
            .collect();
        Self { sensors, by_name }
    }

    /// The six sensors of the cloud-lada car. The database gets them from
    /// `schema/migrations/0001_init.sql`; a store test checks the two agree.
    pub fn builtin() -> Vec<Sensor> {
        let s = |id, name: &str, unit: &str, description: &str, min, max| Sensor {
            id: SensorId(id),
            name: SensorName::parse(name).expect("built-in names are valid"),
            unit: unit.to_owned(),
            description: description.to_owned(),
            min,
            max,
        };
        vec![
            s(1, "speed", "km/h", "Vehicle speed", None, None),
            s(2, "fuel", "%", "Fuel tank level", None, None),
            s(
                3,
                "revolution",
                "rpm",
                "Engine revolutions per minute",
                None,
                None,
            ),
            s(
                4,
                "engine_temperature",
                "°C",
                "Engine coolant temperature",
                None,
                None,
            ),
            s(
                5,
                "location_latitude",
                "degrees",
                "GPS latitude (WGS 84)",
                Some(-90.0),
                Some(90.0),
            ),
            s(
                6,
                "location_longitude",
                "degrees",
                "GPS longitude (WGS 84)",
                Some(-180.0),
                Some(180.0),
            ),
        ]
    }

    /// Looks a sensor up by name.
    pub fn get(&self, name: &str) -> Option<&Sensor> {
        self.by_name.get(name).map(|&i| &self.sensors[i])
    }

    /// Looks a sensor up by id.
    pub fn by_id(&self, id: SensorId) -> Option<&Sensor> {
        self.sensors
            .binary_search_by_key(&id, |s| s.id)
            .ok()
            .map(|i| &self.sensors[i])
    }

    /// Every sensor, ordered by id.
    pub fn iter(&self) -> impl Iterator<Item = &Sensor> {
        self.sensors.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_has_the_seed_sensors() {
        let c = Catalog::new(Catalog::builtin());
        for name in [
            "speed",
            "fuel",
            "revolution",
            "engine_temperature",
            "location_latitude",
            "location_longitude",
        ] {
            let s = c.get(name).unwrap();
            assert_eq!(c.by_id(s.id).unwrap().name.as_str(), name);
        }
        assert!(c.get("rpm").is_none());
    }

    #[test]
    fn ranges_are_enforced() {
        let c = Catalog::new(Catalog::builtin());
        let lat = c.get("location_latitude").unwrap();
        assert_eq!(lat.check_value(90.0), Ok(90.0));
        assert!(matches!(
            lat.check_value(90.5),
            Err(ValueError::OutOfRange { .. })
        ));
        assert_eq!(
            c.get("speed").unwrap().check_value(f64::NAN),
            Err(ValueError::NotFinite)
        );
    }

    #[test]
    fn sensor_names() {
        assert!(SensorName::parse("oil_pressure2").is_ok());
        assert!(SensorName::parse("2x").is_err());
        assert!(SensorName::parse("Speed").is_err());
        assert!(SensorName::parse("").is_err());
    }
}

use std::fmt;

/// Name of the vehicle or machine a reading came from: `[A-Za-z0-9_.-]{1,64}`.
///
/// Readings that do not name a device belong to [`Device::default_device`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Device(String);

/// Why a device name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Empty or longer than 64 bytes.
    #[error("device must be 1 to 64 characters long")]
    Length,
    /// Contains something other than letters, digits, `_`, `.` or `-`.
    #[error("device may only contain letters, digits, '_', '.' and '-'")]
    Charset,
}

impl Device {
    /// Longest accepted device name, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Parses a device name.
    pub fn parse(s: &str) -> Result<Self, DeviceError> {
        Self::check(s)?;
        Ok(Self(s.to_owned()))
    }

    /// Checks a device name without allocating.
    pub fn check(s: &str) -> Result<(), DeviceError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(DeviceError::Length);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(DeviceError::Charset);
        }
        Ok(())
    }

    /// The device of readings that name none.
    pub fn default_device() -> Self {
        Self("default".to_owned())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lets maps keyed by `Device` be looked up by a `&str` without allocating (the
/// derived `Hash` and `Eq` are those of the name).
impl std::borrow::Borrow<str> for Device {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Device {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Small integer the store uses for a device in place of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_charset() {
        assert!(Device::parse("truck-1.A_b").is_ok());
        assert_eq!(Device::parse(&"a".repeat(64)).unwrap().as_str().len(), 64);
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(Device::parse(""), Err(DeviceError::Length));
        assert_eq!(Device::parse(&"a".repeat(65)), Err(DeviceError::Length));
        assert_eq!(Device::parse("a b"), Err(DeviceError::Charset));
        assert_eq!(Device::parse("é"), Err(DeviceError::Charset));
    }
}

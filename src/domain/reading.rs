use super::{Device, SensorId, Timestamp};

/// One valid reading inside a [`Batch`]. `device` indexes [`Batch::devices`], so a
/// batch names each device once however many readings it has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    /// Index into the batch's device table.
    pub device: u16,
    /// Catalogued sensor.
    pub sensor: SensorId,
    /// When it was measured.
    pub ts: Timestamp,
    /// Finite value, within the sensor's range.
    pub value: f64,
}

/// Valid readings, in the order they arrived, ready for the writer.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Devices the rows refer to by index.
    pub devices: Vec<Device>,
    /// The readings.
    pub rows: Vec<Row>,
}

impl Batch {
    /// Most distinct devices one batch can name.
    pub const MAX_DEVICES: usize = u16::MAX as usize;

    /// Adds `device`, which the caller knows is not in the table yet, and returns its
    /// index; `None` when the table is full or the name is invalid.
    pub fn push_device(&mut self, device: &str) -> Option<u16> {
        if self.devices.len() >= Self::MAX_DEVICES {
            return None;
        }
        self.devices.push(Device::parse(device).ok()?);
        Some((self.devices.len() - 1) as u16)
    }

    /// Number of readings.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there are no readings.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

//! A simulated car, one second at a time: trips and stops, speed that accelerates
//! and brakes towards the road's limit, engine speed from the gear, fuel that the
//! distance burns and a refuelling puts back, an engine that warms up and cools down,
//! and a GPS position that follows straight roads with turns.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One second's readings of a car (the six built-in sensors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// km/h.
    pub speed: f64,
    /// rpm (0 with the engine off).
    pub revolution: f64,
    /// Percent of the tank.
    pub fuel: f64,
    /// °C.
    pub engine_temperature: f64,
    /// Degrees north.
    pub latitude: f64,
    /// Degrees east.
    pub longitude: f64,
}

impl Sample {
    /// The six readings as NDJSON lines of `device` at `at`, appended to `body`.
    pub fn write_ndjson(&self, body: &mut String, device: &str, at: chrono::DateTime<chrono::Utc>) {
        use std::fmt::Write as _;
        let ts = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        for (sensor, value) in [
            ("speed", self.speed),
            ("revolution", self.revolution),
            ("fuel", self.fuel),
            ("engine_temperature", self.engine_temperature),
            ("location_latitude", self.latitude),
            ("location_longitude", self.longitude),
        ] {
            let _ = writeln!(
                body,
                r#"{{"device":"{device}","sensor":"{sensor}","value":{value:.6},"timestamp":"{ts}"}}"#
            );
        }
    }
}

/// What the car is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Driving; seconds left in this trip.
    Driving { left: u32 },
    /// Parked, engine off; seconds left.
    Parked { left: u32 },
    /// Parked at a fuel station, filling up; seconds left.
    Refuelling { left: u32 },
}

/// Gear ratios as rpm per km/h, and the speed each gear is used up to.
const GEARS: [(f64, f64); 5] = [
    (110.0, 15.0),
    (62.0, 30.0),
    (42.0, 50.0),
    (32.0, 72.0),
    (26.0, f64::MAX),
];
const IDLE_RPM: f64 = 800.0;
const AMBIENT_C: f64 = 12.0;
const RUNNING_C: f64 = 90.0;
/// Litres in a full tank, and consumption per km (roughly 6.5 l/100 km).
const TANK_L: f64 = 45.0;
const LITRES_PER_KM: f64 = 0.065;
const METRES_PER_DEGREE: f64 = 111_320.0;

/// A simulated car.
pub struct Car {
    rng: StdRng,
    phase: Phase,
    speed_kmh: f64,
    /// Speed the road allows now, and seconds until it changes.
    limit_kmh: f64,
    limit_left: u32,
    fuel_pct: f64,
    temp_c: f64,
    lat: f64,
    lon: f64,
    /// Degrees clockwise from north, the road's and the one being turned to.
    heading: f64,
    target_heading: f64,
    /// Metres until the next turn.
    to_turn_m: f64,
    /// Refuel when this second (counted from the start) comes while parked or driving.
    refuel_at: Option<u64>,
    second: u64,
    /// Live: no more parking, only fuel stops.
    live: bool,
}

impl Car {
    /// Car number `n` (different start and route per car), starting parked, set to
    /// refuel after `refuel_after` seconds (when it next stops), if any.
    pub fn new(n: u64, refuel_after: Option<u64>) -> Self {
        let mut rng = StdRng::seed_from_u64(0x1ada_0000 + n);
        let heading = rng.random_range(0.0..360.0_f64).round();
        Self {
            phase: Phase::Parked { left: 600 },
            speed_kmh: 0.0,
            limit_kmh: 50.0,
            limit_left: 60,
            // Enough for most of a day's driving, not all of it.
            fuel_pct: rng.random_range(55.0..70.0),
            temp_c: AMBIENT_C,
            lat: 52.52 + n as f64 * 0.013,
            lon: 13.405 - n as f64 * 0.021,
            heading,
            target_heading: heading,
            to_turn_m: 800.0,
            refuel_at: refuel_after,
            second: 0,
            live: false,
            rng,
        }
    }

    /// Keeps the car on the road from now on (the live part of the demo).
    pub fn keep_driving(&mut self) {
        self.live = true;
        self.phase = Phase::Driving { left: u32::MAX };
    }

    /// Advances one second and returns what the sensors read.
    pub fn step(&mut self) -> Sample {
        self.second += 1;
        self.phase = match self.phase {
            Phase::Driving { left } if left == 0 && self.speed_kmh < 1.0 => self.park(),
            // Low on fuel: this trip ends at the next chance (a fuel station).
            Phase::Driving { .. } if self.fuel_pct < 10.0 => Phase::Driving { left: 0 },
            Phase::Driving { left } => Phase::Driving {
                left: left.saturating_sub(1),
            },
            Phase::Parked { left: 0 } | Phase::Refuelling { left: 0 } => Phase::Driving {
                left: self.rng.random_range(20 * 60..80 * 60),
            },
            Phase::Parked { left } => Phase::Parked { left: left - 1 },
            Phase::Refuelling { left } => Phase::Refuelling { left: left - 1 },
        };
        let driving = matches!(self.phase, Phase::Driving { .. });
        self.drive(driving);
        let engine_on = driving;
        // Engine temperature: warms towards 90 °C within minutes, cools in an hour.
        let (target, tau) = if engine_on {
            (RUNNING_C + self.speed_kmh / 40.0, 240.0)
        } else {
            (AMBIENT_C, 2400.0)
        };
        self.temp_c += (target - self.temp_c) / tau;
        if let Phase::Refuelling { .. } = self.phase {
            self.fuel_pct = (self.fuel_pct + 0.6).min(97.0);
        }
        let revolution = if !engine_on {
            0.0
        } else {
            let (ratio, _) = GEARS
                .iter()
                .copied()
                .find(|(_, up_to)| self.speed_kmh <= *up_to)
                .unwrap_or(GEARS[4]);
            (self.speed_kmh * ratio).max(IDLE_RPM) + self.rng.random_range(-25.0..25.0)
        };
        let noise = |rng: &mut StdRng, a: f64| rng.random_range(-a..a);
        Sample {
            speed: (self.speed_kmh
                + if driving && self.speed_kmh > 2.0 {
                    noise(&mut self.rng, 0.4)
                } else {
                    0.0
                })
            .max(0.0),
            revolution,
            fuel: self.fuel_pct,
            engine_temperature: self.temp_c + noise(&mut self.rng, 0.2),
            latitude: self.lat,
            longitude: self.lon,
        }
    }

    /// The end of a trip: parked, or refuelling when it is time or the tank is low.
    fn park(&mut self) -> Phase {
        match self.refuel_at {
            Some(at) if self.second >= at => {
                self.refuel_at = None;
                Phase::Refuelling { left: 8 * 60 }
            }
            _ if self.fuel_pct < 20.0 => Phase::Refuelling { left: 8 * 60 },
            _ if self.live => Phase::Driving { left: u32::MAX },
            _ => Phase::Parked {
                left: self.rng.random_range(30 * 60..180 * 60),
            },
        }
    }

    /// Speed towards the road's limit (or to a stop at a trip's end), distance, fuel
    /// and position for one second.
    fn drive(&mut self, driving: bool) {
        let ending = matches!(self.phase, Phase::Driving { left: 0 });
        if self.limit_left == 0 {
            // City, country road or motorway; now and then a red light.
            self.limit_kmh = *[0.0, 30.0, 50.0, 50.0, 70.0, 90.0, 100.0, 120.0]
                .get(self.rng.random_range(0..8))
                .unwrap_or(&50.0);
            self.limit_left = if self.limit_kmh == 0.0 {
                self.rng.random_range(20..60)
            } else {
                self.rng.random_range(60..300)
            };
        }
        self.limit_left -= 1;
        let target = if driving && !ending {
            self.limit_kmh
        } else {
            0.0
        };
        // ~2.5 m/s² up (9 km/h a second), ~3.5 m/s² braking.
        let delta = (target - self.speed_kmh).clamp(-12.0, 9.0);
        self.speed_kmh = (self.speed_kmh + delta * 0.6).max(0.0);
        if self.speed_kmh < 0.5 && target == 0.0 {
            self.speed_kmh = 0.0;
        }
        let metres = self.speed_kmh / 3.6;
        self.fuel_pct = (self.fuel_pct - metres / 1000.0 * LITRES_PER_KM / TANK_L * 100.0).max(1.0);
        // Roads: straight stretches, then a turn of 90° (or a bend of 30°) taken
        // over a few seconds.
        self.to_turn_m -= metres;
        if self.to_turn_m <= 0.0 {
            let turn = *[-90.0, 90.0, -30.0, 30.0]
                .get(self.rng.random_range(0..4))
                .unwrap_or(&90.0);
            self.target_heading = (self.target_heading + turn).rem_euclid(360.0);
            self.to_turn_m = self.rng.random_range(300.0..2500.0);
        }
        let diff = (self.target_heading - self.heading + 540.0).rem_euclid(360.0) - 180.0;
        if metres > 0.0 {
            self.heading = (self.heading + diff.clamp(-15.0, 15.0)).rem_euclid(360.0);
        }
        let rad = self.heading.to_radians();
        self.lat += metres * rad.cos() / METRES_PER_DEGREE;
        self.lon += metres * rad.sin() / (METRES_PER_DEGREE * self.lat.to_radians().cos());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_of_driving_is_physically_coupled_and_refuels_once() {
        for n in 0..4 {
            a_day_of(Car::new(n, Some(14 * 3600)));
        }
    }

    fn a_day_of(mut car: Car) {
        let day: Vec<Sample> = (0..86_400).map(|_| car.step()).collect();
        // It drives and it parks.
        let moving = day.iter().filter(|s| s.speed > 5.0).count();
        assert!((86_400 / 10..86_400 * 3 / 5).contains(&moving), "{moving}");
        // It never runs dry before the refuelling.
        assert!(day.iter().all(|s| s.fuel > 5.0), "ran dry");
        // Engine speed follows speed: off when parked, at least idle when moving.
        assert!(
            day.iter()
                .all(|s| (s.speed == 0.0) || s.revolution >= IDLE_RPM - 30.0)
        );
        assert!(
            day.iter()
                .filter(|s| s.revolution == 0.0)
                .all(|s| s.speed == 0.0)
        );
        // Warm while driving long enough, never hotter than a healthy engine.
        assert!(day.iter().any(|s| s.engine_temperature > 85.0));
        assert!(day.iter().all(|s| s.engine_temperature < 100.0));
        // Fuel goes down, except for refuelling (the one asked for, and when low),
        // which brings it up by far.
        let rises: Vec<f64> = day
            .windows(2)
            .map(|w| w[1].fuel - w[0].fuel)
            .filter(|d| *d > 0.0)
            .collect();
        let risen: f64 = rises.iter().sum();
        assert!(
            risen > 40.0 && rises.len() < 500,
            "{risen} in {} steps",
            rises.len()
        );
        // The route moves no faster than the car drives (1 s apart).
        for w in day.windows(2) {
            let dy = (w[1].latitude - w[0].latitude) * METRES_PER_DEGREE;
            let dx = (w[1].longitude - w[0].longitude)
                * METRES_PER_DEGREE
                * w[0].latitude.to_radians().cos();
            assert!((dx * dx + dy * dy).sqrt() <= 130.0 / 3.6 + 1e-6);
        }
    }
}

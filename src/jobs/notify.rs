//! Webhook notifications of new anomalies.
//!
//! The anomalies table remembers which anomalies a webhook has not had yet
//! (`notified_us IS NULL`), so a restart resends what a crash interrupted. One task
//! sends them, one POST per alert with everything new, retried with exponential
//! backoff; every attempt goes to the delivery log. After the last attempt the
//! anomalies are marked done anyway (the log says it failed): a dead receiver does
//! not get an ever-growing backlog.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::{Alert, Anomaly, Delivery, Timestamp};
use crate::metrics::Metrics;
use crate::store::AlertStore;

/// How webhooks are sent.
#[derive(Debug, Clone, Copy)]
pub struct NotifySettings {
    /// Attempts per notification, the first included.
    pub attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub backoff: Duration,
    /// Time limit of one POST.
    pub timeout: Duration,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            attempts: 5,
            backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The JSON body a webhook receives.
#[derive(Debug, Serialize)]
pub struct Notification<'a> {
    /// `[alert name]: N anomalies in sensor`.
    pub subject: String,
    /// The alert.
    pub alert: AlertRef<'a>,
    /// The new anomalies, oldest first.
    pub anomalies: Vec<AnomalyNote>,
}

/// The alert a notification is about.
#[derive(Debug, Serialize)]
pub struct AlertRef<'a> {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: &'a str,
    /// The device.
    pub device: &'a str,
    /// The sensor.
    pub sensor: &'a str,
}

/// One anomaly in a notification.
#[derive(Debug, Serialize)]
pub struct AnomalyNote {
    /// Its id.
    pub id: i64,
    /// Start of the first bucket after the step (RFC 3339).
    pub time: String,
    /// `up` or `down`.
    pub direction: &'static str,
    /// Mean before the step.
    pub before: f64,
    /// Mean after it.
    pub after: f64,
    /// (after − before) / |before| × 100; absent when before is 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent_change: Option<f64>,
    /// The algorithm's statistic.
    pub statistic: f64,
    /// `before → after (+x %)`, for people.
    pub change: String,
}

/// The subject line: `[brake-temp]: 2 anomalies in engine_temperature`.
pub fn subject(alert: &Alert, n: usize) -> String {
    format!(
        "[{}]: {n} {} in {}",
        alert.spec.name,
        if n == 1 { "anomaly" } else { "anomalies" },
        alert.spec.sensor
    )
}

fn note(a: &Anomaly) -> AnomalyNote {
    let f = &a.found;
    let pct = f.percent_change();
    AnomalyNote {
        id: a.id,
        time: f.at.to_string(),
        direction: f.step.as_str(),
        before: f.before_mean,
        after: f.after_mean,
        percent_change: pct,
        statistic: f.statistic,
        change: match pct {
            Some(p) => format!("{:.4} → {:.4} ({p:+.1} %)", f.before_mean, f.after_mean),
            None => format!("{:.4} → {:.4}", f.before_mean, f.after_mean),
        },
    }
}

/// Sends pending notifications whenever `wake` rings (and once at start), until
/// `stop`.
pub async fn run(
    alerts: Arc<AlertStore>,
    settings: NotifySettings,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(settings.timeout)
        .user_agent(concat!("milepost/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; notifications are off");
            return;
        }
    };
    loop {
        send_pending(&alerts, &client, settings, &metrics, &stop).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
        }
    }
}

async fn send_pending(
    alerts: &Arc<AlertStore>,
    client: &reqwest::Client,
    settings: NotifySettings,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    let store = alerts.clone();
    let pending = tokio::task::spawn_blocking(move || {
        let mut by_alert: BTreeMap<i64, (Alert, Vec<Anomaly>)> = BTreeMap::new();
        for a in store.unnotified()? {
            if let Some(entry) = by_alert.get_mut(&a.alert_id) {
                entry.1.push(a);
                continue;
            }
            let alert = store.alert(a.alert_id)?;
            by_alert.insert(a.alert_id, (alert, vec![a]));
        }
        Ok::<_, crate::store::AlertStoreError>(by_alert)
    })
    .await;
    let pending = match pending {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read pending notifications");
            return;
        }
        Err(_) => return,
    };
    for (_, (alert, anomalies)) in pending {
        if stop.is_cancelled() {
            return;
        }
        deliver(alerts, client, settings, metrics, &alert, &anomalies, stop).await;
    }
}

#[tracing::instrument(skip_all, fields(alert = alert.id, anomalies = anomalies.len()))]
async fn deliver(
    alerts: &Arc<AlertStore>,
    client: &reqwest::Client,
    settings: NotifySettings,
    metrics: &Metrics,
    alert: &Alert,
    anomalies: &[Anomaly],
    stop: &CancellationToken,
) {
    let ids: Vec<i64> = anomalies.iter().map(|a| a.id).collect();
    let Some(url) = alert.spec.webhook.clone() else {
        mark(alerts, ids).await;
        return;
    };
    let body = Notification {
        subject: subject(alert, anomalies.len()),
        alert: AlertRef {
            id: alert.id,
            name: &alert.spec.name,
            device: alert.spec.device.as_str(),
            sensor: alert.spec.sensor.as_str(),
        },
        anomalies: anomalies.iter().map(note).collect(),
    };
    let mut wait = settings.backoff;
    for attempt in 1..=settings.attempts.max(1) {
        let sent = client.post(url.clone()).json(&body).send().await;
        let (ok, status_code, error) = match sent {
            Ok(r) if r.status().is_success() => (true, r.status().as_u16(), String::new()),
            Ok(r) => (
                false,
                r.status().as_u16(),
                format!("receiver answered {}", r.status()),
            ),
            Err(e) => (false, 0, e.to_string()),
        };
        let delivery = Delivery {
            id: 0,
            alert_id: alert.id,
            url: url.to_string(),
            subject: body.subject.clone(),
            anomaly_ids: ids.clone(),
            attempt,
            ok,
            status_code,
            error: error.clone(),
            at: Timestamp::now(),
        };
        let store = alerts.clone();
        let _ = tokio::task::spawn_blocking(move || store.log_delivery(&delivery)).await;
        if ok {
            metrics.webhook_ok.inc();
            tracing::info!(attempt, "webhook delivered");
            break;
        }
        metrics.webhook_failed.inc();
        tracing::warn!(attempt, error, "webhook delivery failed");
        if attempt == settings.attempts.max(1) {
            tracing::error!("webhook gave up after {attempt} attempts; see the delivery log");
            break;
        }
        tokio::select! {
            // Not marked: the next start sends them again.
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = wait.saturating_mul(2);
    }
    mark(alerts, ids).await;
}

async fn mark(alerts: &Arc<AlertStore>, ids: Vec<i64>) {
    let store = alerts.clone();
    match tokio::task::spawn_blocking(move || store.mark_notified(&ids)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot mark anomalies notified"),
        Err(_) => {}
    }
}

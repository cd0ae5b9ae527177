//! The console in a real browser (Debian's headless Chromium, its command line:
//! `--dump-dom` after the page's script ran, `--screenshot`), against a live server
//! with two devices, a dump and an anomaly. Screenshots are left in
//! `target/tmp/console-screenshots/` as test artifacts.

use std::path::PathBuf;
use std::process::Command;

use reqwest::StatusCode;

use crate::helpers::*;

struct Browser {
    exe: PathBuf,
    profile: tempfile::TempDir,
}

/// What the browser made of a page.
struct Loaded {
    /// The DOM after the page's script ran.
    dom: String,
    /// The browser's log (console messages included).
    log: String,
}

impl Browser {
    fn new() -> Self {
        Self {
            exe: crate::tools::ensure_chromium(),
            profile: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, tz: &str) -> Command {
        let mut c = Command::new(&self.exe);
        // As root in a container, and without the background connections this
        // machine's closed network refuses.
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--window-size=1280,1600",
        ])
        .arg(format!("--user-data-dir={}", self.profile.path().display()))
        .env("TZ", tz);
        c
    }

    /// Loads `url` with the browser's zone `tz`.
    async fn load(&self, url: &str, tz: &str) -> Loaded {
        let mut c = self.command(tz);
        c.arg("--dump-dom").arg(url);
        let out = tokio::task::spawn_blocking(move || c.output_within_limit())
            .await
            .unwrap();
        assert!(out.status.success(), "chromium failed on {url}: {out:?}");
        let loaded = Loaded {
            dom: String::from_utf8_lossy(&out.stdout).into_owned(),
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        for bad in [
            "Uncaught",
            "Failed to load resource",
            "SyntaxError",
            "TypeError",
        ] {
            assert!(
                !loaded.log.contains(bad),
                "{url}: the browser logged {bad}:\n{}",
                loaded.log
            );
        }
        loaded
    }

    /// Saves a screenshot of `url` as `name`.png among the test artifacts.
    async fn screenshot(&self, url: &str, name: &str) {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&file);
        let mut c = self.command("UTC");
        c.arg(format!("--screenshot={}", file.display())).arg(url);
        let out = tokio::task::spawn_blocking(move || c.output_within_limit())
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let png = std::fs::read(&file).expect("the screenshot was written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{}",
            file.display()
        );
    }
}

/// The value of `attr` on the element with this `id` in a serialized DOM.
fn attr_of(dom: &str, id: &str, attr: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    let tag = &dom[start..end];
    let key = format!("{attr}=\"");
    let v = tag
        .find(&key)
        .map(|i| &tag[i + key.len()..])
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no {attr} in {tag}"));
    v.replace("&amp;", "&")
}

/// `href` values of links whose text is `text`.
fn links(dom: &str, text: &str) -> Vec<String> {
    dom.match_indices(&format!(">{text}</a>"))
        .map(|(i, _)| {
            let start = dom[..i].rfind("<a ").unwrap();
            let tag = &dom[start..i];
            let h = tag.find("href=\"").unwrap() + 6;
            tag[h..].split('"').next().unwrap().replace("&amp;", "&")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_devices_charts_anomalies_and_dumps_in_a_browser() {
    let browser = Browser::new();
    let (app, _) = crate::charts::app_with_a_step().await;
    // A second device, driving now.
    let now = chrono::Utc::now();
    let mut body = String::new();
    for i in 0..120 {
        let ts = (now - chrono::Duration::seconds(600 - i * 5)).to_rfc3339();
        body += &format!("{}\n", dline("car-2", "speed", 40.0 + i as f64 * 0.2, &ts));
        body += &format!(
            "{}\n",
            dline("car-2", "location_latitude", 52.5 + i as f64 * 1e-4, &ts)
        );
        body += &format!(
            "{}\n",
            dline("car-2", "location_longitude", 13.4 + i as f64 * 2e-4, &ts)
        );
    }
    assert_eq!(app.ingest(body).await.0, StatusCode::OK);
    let day = chrono::NaiveDate::from_ymd_opt(2026, 1, 10).unwrap();
    app.server().dumper().dump_day(day).await.expect("dumped");

    // Overview: both devices with their latest values; lada is silent.
    let overview = browser.load(&app.url("/?tz=Europe/Berlin"), "UTC").await;
    let dom = &overview.dom;
    assert!(dom.contains("data-device=\"lada\"") && dom.contains("data-device=\"car-2\""));
    assert!(
        dom.contains("99.5 °C"),
        "lada's latest engine temperature: {dom}"
    );
    assert!(dom.contains("63.8 km/h"), "car-2's latest speed");
    assert!(dom.contains("have sent nothing for over an hour"));
    assert!(dom.contains("Europe/Berlin"));
    browser.screenshot(&app.url("/"), "overview").await;

    // Without ?tz= the script asks for the page in the browser's zone.
    let tokyo = browser.load(&app.url("/"), "Asia/Tokyo").await;
    assert!(tokyo.dom.contains(">Asia/Tokyo<"), "the script set ?tz=");

    // lada's page around the step: a chart per sensor with data, the step in it.
    let page = "/device?name=lada&from=2026-01-10T00:00:00Z&to=2026-01-10T03:00:00Z&tz=UTC";
    let device = browser.load(&app.url(page), "UTC").await;
    let src = attr_of(&device.dom, "chart-engine_temperature", "src");
    assert!(
        !device.dom.contains("id=\"chart-speed\""),
        "no chart for a sensor without data"
    );
    let chart = app
        .client
        .get(app.url(&format!("/{src}")))
        .send()
        .await
        .unwrap();
    assert_eq!(chart.status(), StatusCode::OK, "{src}");
    let chart = chart.text().await.unwrap();
    assert!(
        chart.contains("stroke=\"#D62728\""),
        "the anomaly marker is on the chart"
    );
    assert!(
        device.dom.contains("class=\"anomaly\""),
        "the step is listed on the page"
    );
    browser.screenshot(&app.url(page), "device-lada").await;

    // car-2 drives: live values, its track, a speed chart, downloads.
    let car = browser
        .load(&app.url("/device?name=car-2&range=1h&tz=UTC"), "UTC")
        .await;
    let track = attr_of(&car.dom, "track", "src");
    let t = app
        .client
        .get(app.url(&format!("/{track}")))
        .send()
        .await
        .unwrap();
    assert_eq!(t.headers()["content-type"], "image/svg+xml");
    attr_of(&car.dom, "chart-speed", "src");
    let csv = links(&car.dom, "CSV");
    assert_eq!(csv.len(), 3, "{csv:?}");
    let got = app
        .client
        .get(app.url(&format!("/{}", csv[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert!(got.text().await.unwrap().lines().count() > 100);
    browser
        .screenshot(&app.url("/device?name=car-2&range=1h"), "device-car-2")
        .await;

    // Anomalies: the step, linking to a chart around it.
    let list = browser
        .load(&app.url("/anomalies?device=lada&tz=UTC"), "UTC")
        .await;
    assert!(list.dom.contains("class=\"anomaly\""));
    let around = links(&list.dom, "chart");
    assert!(!around.is_empty());
    let r = app
        .client
        .get(app.url(&format!("/{}", around[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("id=\"chart-engine_temperature\"")
    );
    browser
        .screenshot(&app.url("/anomalies"), "anomalies")
        .await;

    // Dumps: both files of the day, downloadable.
    let dumps = browser.load(&app.url("/dumps?tz=UTC"), "UTC").await;
    let downloads = links(&dumps.dom, "download");
    assert_eq!(downloads.len(), 2, "{}", dumps.dom);
    for d in downloads {
        let r = app
            .client
            .get(app.url(&format!("/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{d}");
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    browser.screenshot(&app.url("/dumps"), "dumps").await;

    let system = browser.load(&app.url("/system?tz=UTC"), "UTC").await;
    assert!(system.dom.contains("Readings stored") && system.dom.contains("openapi.json"));
    browser.screenshot(&app.url("/system"), "system").await;

    // What does not exist is a 404 page, not an error of the server.
    for path in [
        "/device?name=nobody",
        "/device?name=lada&sensor=warp",
        "/device?name=..",
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
    }
    let r = app
        .client
        .get(app.url("/device?name=lada&tz=Mars/Base"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_server_shows_the_first_steps() {
    let browser = Browser::new();
    let app = TestApp::spawn().await;
    let first = browser.load(&app.url("/?tz=UTC"), "UTC").await;
    assert!(first.dom.contains("No readings yet"), "{}", first.dom);
    assert!(first.dom.contains("milepost push"));
    assert!(first.dom.contains(&format!("--url {}", app.base)));
    browser.screenshot(&app.url("/"), "first-steps").await;
}

#[tokio::test]
async fn the_console_moves_aside_for_a_dashboard_and_can_be_turned_off() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), "<p>cloud-lada</p>").unwrap();
    let dir = site.path().to_owned();
    let app = TestApp::spawn_with(move |a| a.dashboard_dir = Some(dir)).await;
    let text = |path: &'static str| {
        let (c, url) = (app.client.clone(), app.url(path));
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    assert!(text("/").await.1.contains("cloud-lada"));
    let (s, body) = text("/console/").await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("No readings yet"));
    // The console's links are relative: its stylesheet is under /console/.
    assert!(body.contains("href=\"assets/console.css\""));
    assert_eq!(text("/console/assets/console.css").await.0, StatusCode::OK);

    let off = TestApp::spawn_with(|a| a.console = milepost::config::Toggle::Off).await;
    let r = off.client.get(off.url("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
}

/// The "Today" cell of `device`'s row on the overview.
fn today_cell(page: &str, device: &str) -> u64 {
    let row = page
        .split(&format!("data-device=\"{device}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no row of {device}"));
    let row = &row[..row.find("</tr>").unwrap()];
    let cell = row.split("<td class=\"num\">").nth(1).unwrap();
    cell[..cell.find('<').unwrap()].trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_today_are_exact_through_live_readings_late_uploads_and_new_devices() {
    let app = TestApp::spawn().await;
    let now = chrono::Utc::now();
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let mut sent: Vec<(String, chrono::DateTime<chrono::Utc>)> = Vec::new();
    let send = |device: &str, secs_ago: std::ops::Range<i64>, sent: &mut Vec<_>| {
        let mut body = String::new();
        for s in secs_ago {
            let ts = now - chrono::Duration::seconds(s);
            for sensor in ["speed", "fuel"] {
                body += &format!("{}\n", dline(device, sensor, 1.0, &ts.to_rfc3339()));
                sent.push((device.to_owned(), ts));
            }
        }
        body
    };
    let expected = |sent: &[(String, chrono::DateTime<chrono::Utc>)], device: &str| {
        sent.iter()
            .filter(|(d, ts)| d == device && *ts >= midnight)
            .count() as u64
    };
    let page = || {
        let (c, url) = (app.client.clone(), app.url("/?tz=UTC"));
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    };
    // Today and yesterday (a day and more ago), in small requests (the ingest log:
    // acknowledged before DuckDB holds them, and counted all the same).
    for body in [
        send("a", 100..150, &mut sent),
        send("a", 86_500..86_520, &mut sent),
        send("b", 60..70, &mut sent),
    ] {
        assert_eq!(app.ingest(body).await.0, StatusCode::OK);
    }
    let p = page().await;
    assert_eq!(today_cell(&p, "a"), expected(&sent, "a"));
    assert_eq!(today_cell(&p, "b"), expected(&sent, "b"));
    // Live readings: the kept count is extended.
    let body = send("a", 30..40, &mut sent);
    assert_eq!(app.ingest(body).await.0, StatusCode::OK);
    assert_eq!(today_cell(&page().await, "a"), expected(&sent, "a"));
    // A late upload from hours ago, and a device new since the last view.
    let late = send("a", 7200..7210, &mut sent) + &send("c", 5..8, &mut sent);
    assert_eq!(app.ingest(late).await.0, StatusCode::OK);
    let p = page().await;
    for d in ["a", "b", "c"] {
        assert_eq!(today_cell(&p, d), expected(&sent, d), "{d}");
    }
    // The row's picture: readings per hour of the last 24 h, all sensors together.
    assert!(p.contains("src=\"spark.svg?name=a&amp;tz=UTC\""));
    let r = app
        .client
        .get(app.url("/spark.svg?name=a&tz=UTC"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    let svg = r.text().await.unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("an SVG document");
    let label = doc.root_element().attribute("aria-label").unwrap();
    let per_hour: Vec<u64> = label
        .rsplit(": ")
        .next()
        .unwrap()
        .split(", ")
        .map(|n| n.parse().unwrap())
        .collect();
    let day_ago = now - chrono::Duration::hours(24);
    let last_day = sent
        .iter()
        .filter(|(d, ts)| d == "a" && *ts >= day_ago)
        .count() as u64;
    assert_eq!(per_hour.iter().sum::<u64>(), last_day, "{label}");
    assert_eq!(
        doc.descendants().filter(|n| n.has_tag_name("rect")).count(),
        per_hour.len()
    );
    let r = app
        .client
        .get(app.url("/spark.svg?name=nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// `milepost serve` with no key configured: the first-steps page names the key file
/// it generated, in copy-paste lines that work.
#[tokio::test]
async fn the_first_steps_name_the_generated_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_milepost"));
    let server = milepost::bench::process::ServerProcess::start(exe, &data, &[], false)
        .expect("starts without a key");
    let key_file = data.join("api-key");
    let page = reqwest::get(format!("{}/", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shown = key_file.display().to_string();
    assert!(page.contains(&format!("--api-key-file {shown}")), "{page}");
    // The key in that file is one the server takes.
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap()
        .trim()
        .to_owned();
    let body = format!("{}\n", dline("car-1", "speed", 1.0, "2026-01-05T10:00:00Z"));
    let r = reqwest::Client::new()
        .post(format!("{}/ingest", server.base))
        .basic_auth(key, None::<&str>)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// The devices' rows of an overview page, in order.
fn listed(page: &str) -> Vec<String> {
    page.split("<tr class=\"device-row\" data-device=\"")
        .skip(1)
        .map(|r| r[..r.find('"').unwrap()].to_owned())
        .collect()
}

/// The overview lists devices most recently heard from first, then by name — also
/// where devices with the same newest reading straddle a page boundary — pages
/// through them, searches names, and names the first five silent devices in that
/// order.
#[tokio::test]
async fn the_overview_orders_pages_and_searches_many_devices() {
    let app = TestApp::spawn().await;
    let now = chrono::Utc::now();
    // 45 devices in groups of 7 sharing their newest reading (names given out of
    // order), the three oldest groups over an hour ago.
    let mut devices: Vec<(String, i64)> = Vec::new();
    let mut body = String::new();
    for i in 0..45i64 {
        let name = format!("dev-{:02}", (i * 17) % 45);
        let secs_ago = 900 * (i / 7) + 60;
        let ts = (now - chrono::Duration::seconds(secs_ago)).to_rfc3339();
        body += &format!("{}\n", dline(&name, "speed", 1.0, &ts));
        devices.push((name, secs_ago));
    }
    assert_eq!(app.ingest(body).await.0, StatusCode::OK);
    devices.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let order: Vec<String> = devices.iter().map(|d| d.0.clone()).collect();
    let page = |q: &'static str| {
        let (c, url) = (app.client.clone(), app.url(&format!("/?tz=UTC{q}")));
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let first = page("").await;
    assert_eq!(listed(&first), order[..20]);
    assert_eq!(listed(&page("&page=2").await), order[20..40]);
    assert_eq!(listed(&page("&page=3").await), order[40..]);
    assert_eq!(listed(&page("&page=9").await), order[40..], "the last page");
    let silent: Vec<&String> = devices
        .iter()
        .filter(|d| d.1 > 3600)
        .map(|d| &d.0)
        .collect();
    assert!(
        first.contains(&format!("{} of 45 devices", silent.len())),
        "{first}"
    );
    let banner = &first[first.find("have sent nothing").unwrap()..];
    let banner = &banner[..banner.find("</div>").unwrap()];
    let named: Vec<&str> = banner
        .split("name=")
        .skip(1)
        .map(|s| &s[..s.find(['"', '&']).unwrap()])
        .collect();
    assert_eq!(named, silent[..5], "{banner}");
    let found = page("&q=DEV-1").await;
    let want: Vec<String> = order
        .iter()
        .filter(|d| d.starts_with("dev-1"))
        .cloned()
        .collect();
    assert_eq!(listed(&found), want);
}

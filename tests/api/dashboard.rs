use reqwest::StatusCode;

use crate::helpers::*;

#[tokio::test]
async fn serves_a_static_dashboard_with_spa_fallback_from_the_same_origin() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), "<html>dashboard</html>").unwrap();
    std::fs::create_dir(site.path().join("js")).unwrap();
    std::fs::write(site.path().join("js/app.js"), "console.log(1)").unwrap();
    let dir = site.path().to_owned();
    let app = TestApp::spawn_with(move |a| a.dashboard_dir = Some(dir)).await;
    let get = |p: &str| app.client.get(app.url(p)).send();
    let r = get("/").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "<html>dashboard</html>");
    assert_eq!(
        get("/js/app.js").await.unwrap().text().await.unwrap(),
        "console.log(1)"
    );
    // Client-side routes fall back to index.html ...
    assert_eq!(
        get("/some/route").await.unwrap().text().await.unwrap(),
        "<html>dashboard</html>"
    );
    // ... but API paths never do.
    let (status, body) = app.get("/api/statistics/latest").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("speed").is_some());
    let (status, _) = app.get("/api/unknown").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
}

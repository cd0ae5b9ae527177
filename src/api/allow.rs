//! The `Allow` header of `405 Method Not Allowed` answers (RFC 9110 §15.5.6: the
//! server MUST list the methods the resource supports). poem's router answers 405
//! without it, so the methods are taken from the published OpenAPI document: the
//! header and the spec cannot disagree.

use poem::Response;
use poem::http::{HeaderValue, header};

/// Path templates of the API and the methods each one answers.
#[derive(Debug, Clone, Default)]
pub struct AllowedMethods {
    routes: Vec<(Vec<Segment>, HeaderValue)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// `{name}`: any one non-empty segment.
    Param,
}

impl AllowedMethods {
    /// Reads the `paths` of an OpenAPI document. A path with `GET` also answers
    /// `HEAD` (poem serves it).
    pub fn from_spec(spec: &serde_json::Value) -> Self {
        let mut routes = Vec::new();
        let Some(paths) = spec.get("paths").and_then(|p| p.as_object()) else {
            return Self::default();
        };
        for (template, ops) in paths {
            let Some(ops) = ops.as_object() else { continue };
            let mut methods: Vec<String> = ops
                .keys()
                .filter(|m| {
                    matches!(
                        m.as_str(),
                        "get" | "put" | "post" | "delete" | "patch" | "options" | "head"
                    )
                })
                .map(|m| m.to_ascii_uppercase())
                .collect();
            if methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
                methods.push("HEAD".into());
            }
            if methods.is_empty() {
                continue;
            }
            let Ok(value) = HeaderValue::from_str(&methods.join(", ")) else {
                continue;
            };
            routes.push((segments(template), value));
        }
        Self { routes }
    }

    /// The `Allow` value of `path`, if it is one of the API's paths.
    pub fn for_path(&self, path: &str) -> Option<&HeaderValue> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        self.routes
            .iter()
            .find(|(template, _)| {
                template.len() == parts.len()
                    && template.iter().zip(&parts).all(|(t, p)| match t {
                        Segment::Literal(l) => l == p,
                        Segment::Param => !p.is_empty(),
                    })
            })
            .map(|(_, v)| v)
    }

    /// Adds `Allow` to a 405 answer for `path`.
    pub fn complete(&self, path: &str, mut resp: Response) -> Response {
        if resp.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED
            && let Some(allow) = self.for_path(path)
        {
            resp.headers_mut().insert(header::ALLOW, allow.clone());
        }
        resp
    }
}

fn segments(template: &str) -> Vec<Segment> {
    template
        .trim_matches('/')
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                Segment::Param
            } else {
                Segment::Literal(s.to_owned())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_spec_and_templates_match_one_segment() {
        let spec = serde_json::json!({"paths": {
            "/ingest": {"post": {}},
            "/api/v1/sensors/{sensor}/readings": {"get": {}, "parameters": []},
        }});
        let allow = AllowedMethods::from_spec(&spec);
        assert_eq!(allow.for_path("/ingest").unwrap(), "POST");
        assert_eq!(
            allow.for_path("/api/v1/sensors/speed/readings").unwrap(),
            "GET, HEAD"
        );
        assert!(allow.for_path("/api/v1/sensors//readings").is_none());
        assert!(allow.for_path("/api/v1/sensors/a/b/readings").is_none());
        assert!(allow.for_path("/nothing").is_none());
    }
}

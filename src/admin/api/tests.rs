use super::*;

fn params(q: &str) -> Params {
    Params::parse(Some(q)).expect("parses")
}

#[test]
fn a_query_string_is_decoded_and_invalid_utf8_is_refused() {
    let p = params("name=a%27b+c&tag=env%3Aprod&tag=path%3A%2Fx&tag=");
    assert_eq!(p.get("name"), Some("a'b c"));
    assert_eq!(p.all("tag"), vec!["env:prod", "path:/x"]);
    let e = Params::parse(Some("name=%ff%fe")).expect_err("not UTF-8");
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert!(e.message.contains("not valid UTF-8"), "{}", e.message);
    let long = format!("name={}", "x".repeat(MAX_TEXT + 1));
    assert!(Params::parse(Some(&long)).is_err());
}

#[test]
fn a_chart_request_is_checked_before_any_sql() {
    let now = 1_800_000_000;
    let r = ChartRequest::parse(&params("name=req&type=timer&range=7d&group=env&top=3"), now)
        .expect("valid");
    assert_eq!((r.kind, r.from, r.to), (Kind::Timer, now - 7 * 86_400, now));
    assert_eq!((r.group, r.top), (Some(GroupBy::Tag("env".into())), 3));
    let r =
        ChartRequest::parse(&params("name=req&from=100&to=200&group=host"), now).expect("valid");
    assert_eq!((r.from, r.to, r.group), (100, 200, Some(GroupBy::Host)));
    for (q, says) in [
        ("type=counter", "name is required"),
        ("name=a&type=histogram", "not one of"),
        ("name=a&range=90d", "longer than 62 days"),
        ("name=a&range=soon", "not a duration"),
        ("name=a&from=200&to=100", "must be before"),
        ("name=a&top=0", "top must be"),
        ("name=a&top=999", "top must be"),
        ("name=a&points=100000", "points must be"),
        ("name=a&from=-1", "whole number"),
    ] {
        let e = ChartRequest::parse(&params(q), now).expect_err(q);
        assert!(e.message.contains(says), "{q}: {}", e.message);
    }
}

#[test]
fn the_metric_search_filters_by_name_and_bounds_the_list() {
    use crate::aggregate::census::MetricCensus;
    let m = |name: &str, keys| MetricCensus {
        name: name.into(),
        kind: "counter",
        keys,
        samples: 0,
        per_second: 0.0,
        tag_keys: vec!["env".into()],
    };
    let census = Census {
        metrics: vec![m("api.Requests", 9), m("db.queries", 5), m("api.errors", 2)],
        open_secs: 1.0,
    };
    let v = metrics(&census, &params("q=API&limit=1")).expect("valid");
    assert_eq!(v["total"], 2);
    assert_eq!(v["metrics"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["metrics"][0]["name"], "api.Requests");
    assert_eq!(v["metrics"][0]["tag_keys"][0], "env");
    assert!(metrics(&census, &params("limit=100000")).is_err());
}

#[test]
fn series_are_labelled_by_their_group() {
    assert_eq!(label(&None, "all"), "all");
    assert_eq!(label(&Some(GroupBy::Host), "web-1"), "host:web-1");
    assert_eq!(label(&Some(GroupBy::Tag("env".into())), ""), "env:");
    assert_eq!(
        label(&Some(GroupBy::Tag("env".into())), "env:prod"),
        "env:prod"
    );
    assert_eq!(label(&Some(GroupBy::Tag("env".into())), "other"), "other");
}

//! Unit tests of [`super`]: what each rule field does to a key.

use super::*;
use crate::protocol::statsd::MetricType;

fn rules(toml_rules: &str) -> Rules {
    #[derive(Deserialize)]
    struct File {
        mapping: Vec<RuleSettings>,
    }
    let f: File = toml::from_str(toml_rules).expect("rules parse");
    Rules::compile(&f.mapping).expect("rules compile")
}

fn key(name: &str, tags: &str) -> Vec<u8> {
    KeyBuf::default()
        .build(MetricType::Counter, name.as_bytes(), tags.as_bytes())
        .to_vec()
}

/// `(name, tags)` the rules make of a counter `name` with `tags`, or
/// `None` for a drop; the rule index beside.
fn map(r: &Rules, name: &str, tags: &str) -> (Option<(String, Vec<String>)>, Option<usize>) {
    let k = key(name, tags);
    let mut out = MapBuf::default();
    let parts = |k: &[u8]| {
        let p = key::split(k).expect("splits");
        (
            p.name.to_owned(),
            p.tags.iter().map(|t| (*t).to_owned()).collect(),
        )
    };
    match r.map(&k, &mut out) {
        Mapped::Unchanged => (Some(parts(&k)), r.rule_for(name)),
        Mapped::Dropped(i) => (None, Some(i)),
        Mapped::Changed(i) => (Some(parts(out.key())), Some(i)),
    }
}

fn named(name: &str, tags: &[&str]) -> Option<(String, Vec<String>)> {
    Some((name.into(), tags.iter().map(|t| (*t).to_owned()).collect()))
}

#[test]
fn glob_captures_become_the_name_and_tags() {
    let r = rules(
        r#"
        [[mapping]]
        match = "app.*.requests.*"
        name = "app.requests"
        tags = { service = "$1", code = "${2}" }
        "#,
    );
    assert_eq!(
        map(&r, "app.checkout.requests.200", "env:prod"),
        (
            named(
                "app.requests",
                &["code:200", "env:prod", "service:checkout"]
            ),
            Some(0)
        )
    );
    assert_eq!(map(&r, "db.queries", ""), (named("db.queries", &[]), None));
}

#[test]
fn regex_named_captures_and_a_prefix() {
    let r = rules(
        r#"
        [[mapping]]
        regex = 'jobs\.(?P<queue>[a-z]+)\.(?P<event>done|failed)'
        name = "jobs.${event}"
        prefix = "worker."
        tags = { queue = "${queue}" }
        "#,
    );
    assert_eq!(
        map(&r, "jobs.mail.done", ""),
        (named("worker.jobs.done", &["queue:mail"]), Some(0))
    );
    // Anchored: a name that only contains the pattern is not matched.
    assert_eq!(map(&r, "x.jobs.mail.done", "").1, None);
}

#[test]
fn drop_rules_drop_and_the_first_match_wins() {
    let r = rules(
        r#"
        [[mapping]]
        match = "debug.*"
        drop = true
        [[mapping]]
        match = "*"
        prefix = "svc."
        "#,
    );
    assert_eq!(map(&r, "debug.cache.misses", ""), (None, Some(0)));
    assert_eq!(
        map(&r, "requests", ""),
        (named("svc.requests", &[]), Some(1))
    );
}

#[test]
fn static_tags_replace_the_line_s_and_tags_are_dropped_and_renamed() {
    let r = rules(
        r#"
        [[mapping]]
        match = "http.*"
        drop_tags = ["request_id", "debug"]
        rename_tags = { env = "environment" }
        tags = { team = "web", dc = "" }
        "#,
    );
    assert_eq!(
        map(
            &r,
            "http.hits",
            "request_id:42,env:prod,team:other,debug,path:/a"
        ),
        (
            named("http.hits", &["environment:prod", "path:/a", "team:web"]),
            Some(0)
        )
    );
}

#[test]
fn a_rule_that_changes_nothing_leaves_the_key_unchanged() {
    let r = rules(
        r#"
        [[mapping]]
        match = "a.*"
        drop_tags = ["absent"]
        "#,
    );
    let k = key("a.b", "x:1");
    assert_eq!(r.map(&k, &mut MapBuf::default()), Mapped::Unchanged);
}

#[test]
fn captured_commas_cannot_split_a_tag() {
    let r = rules(
        r#"
        [[mapping]]
        match = "q.*"
        name = "q"
        tags = { arg = "$1" }
        "#,
    );
    assert_eq!(map(&r, "q.a,b", ""), (named("q", &["arg:a_b"]), Some(0)));
}

#[test]
fn bad_rules_name_their_field() {
    let bad = |text: &str| {
        #[derive(Deserialize)]
        struct File {
            mapping: Vec<RuleSettings>,
        }
        let f: File = toml::from_str(text).expect("parses");
        Rules::compile(&f.mapping).expect_err("refused")
    };
    assert_eq!(bad("[[mapping]]\nname = \"x\"\n").1.0, "match");
    assert_eq!(
        bad("[[mapping]]\nmatch = \"a\"\nregex = \"b\"\n").1.0,
        "match"
    );
    assert_eq!(bad("[[mapping]]\nregex = \"(\"\n").1.0, "regex");
    assert_eq!(
        bad("[[mapping]]\nmatch = \"a\"\ndrop = true\nname = \"b\"\n")
            .1
            .0,
        "drop"
    );
    assert_eq!(
        bad("[[mapping]]\nmatch = \"a\"\nname = \"b:c\"\n").1.0,
        "name"
    );
    // Captures the pattern does not have (the second of one `*`, a name
    // it does not define, `$1b` read as the capture `1b`).
    assert_eq!(
        bad("[[mapping]]\nmatch = \"a.*\"\nname = \"x.$2\"\n").1.0,
        "name"
    );
    assert_eq!(
        bad("[[mapping]]\nregex = 'a(?P<x>b)'\nname = \"x.${y}\"\n")
            .1
            .0,
        "name"
    );
    assert_eq!(
        bad("[[mapping]]\nmatch = \"a.*\"\ntags = { k = \"$1b\" }\n")
            .1
            .0,
        "tags"
    );
    let e =
        bad("[[mapping]]\nmatch = \"a\"\n[[mapping]]\nmatch = \"a\"\ntags = { \"k,x\" = \"v\" }\n");
    assert_eq!((e.0, e.1.0), (1, "tags"));
}

//! Unit tests of configured actions: templates, globs, charsets, parameter rules, the
//! argv they build, and running programs without a shell.

use super::*;

fn rule() -> ParamRule {
    ParamRule {
        max_len: DEFAULT_MAX_LEN,
        ..ParamRule::default()
    }
}

#[test]
fn templates_parse_and_render() {
    let t = Template::parse("--unit={unit}.{kind} {{x}}").expect("parse");
    assert_eq!(t.params().collect::<Vec<_>>(), ["unit", "kind"]);
    let mut v = BTreeMap::new();
    v.insert("unit".to_string(), "a b".to_string());
    v.insert("kind".to_string(), "$(x)".to_string());
    assert_eq!(t.render(&v), "--unit=a b.$(x) {x}");
    assert!(matches!(
        Template::parse("{unclosed"),
        Err(TemplateError::Unclosed { .. })
    ));
    assert!(matches!(
        Template::parse("lone }"),
        Err(TemplateError::LoneClose { .. })
    ));
    assert!(matches!(
        Template::parse("{bad name}"),
        Err(TemplateError::NameCharacter { found: ' ', .. })
    ));
    assert!(matches!(
        Template::parse("{}"),
        Err(TemplateError::EmptyName { .. })
    ));
}

/// The messages reach operators (`check-config` problems, command results): their
/// words must not change with the types behind them.
#[test]
fn refusals_read_as_operators_know_them() {
    let shown = |e: &dyn std::error::Error| e.to_string();
    for (text, expected) in [
        (
            "{a b}",
            r#""{a b}": parameter names use [A-Za-z0-9_-], found ' ' (write {{ for a literal brace)"#,
        ),
        ("x{a", r#""x{a": unclosed {"#),
        ("{}", r#""{}": empty parameter name {}"#),
        ("a}", r#""a}": lone } (write }} for a literal brace)"#),
    ] {
        let err = Template::parse(text).expect_err("refused");
        assert_eq!(shown(&err), expected);
    }
    let err = Charset::parse("z-a").expect_err("reversed");
    assert_eq!(shown(&err), r#"charset "z-a": range z-a is reversed"#);
    assert_eq!(shown(&CharsetError::Empty), "charset is empty");
    let a = action();
    for (args, expected) in [
        (
            r#"{"unit":"sshd"}"#,
            r#"argument "unit" value "sshd" is not allowed (allowed: nginx.service)"#,
        ),
        (
            r#"{"unit":"nginx.service","lines":0}"#,
            r#"argument "lines" value "0" is outside 1..=500"#,
        ),
        (
            r#"{"unit":"nginx.service","lines":"x"}"#,
            r#"argument "lines" value "x" is not a decimal integer"#,
        ),
        (
            r#"{"unit":"-x"}"#,
            r#"argument "unit" value "-x" starts with '-' (allow_leading_dash is not set)"#,
        ),
        (r#"{"lines":3}"#, r#"missing argument "unit""#),
        (
            r#"{"unit":"nginx.service","x":1}"#,
            r#"unknown argument "x" (this action takes: lines, unit)"#,
        ),
        ("[1]", "arguments must be a JSON object"),
        (
            r#"{"unit":null}"#,
            r#"argument "unit" must be a string, number or boolean"#,
        ),
    ] {
        assert_eq!(shown(&a.argv(args).expect_err(args)), expected);
    }
    assert!(shown(&a.argv("nope").expect_err("not JSON")).starts_with("arguments are not JSON: "));
    let long = format!(r#"{{"unit":"{}"}}"#, "u".repeat(100));
    assert_eq!(
        shown(&a.argv(&long).expect_err("long")),
        format!(
            r#"argument "unit" value "{}"... is not allowed (allowed: nginx.service)"#,
            "u".repeat(64)
        )
    );
    let mut r = rule();
    r.any = true;
    r.max_len = 3;
    assert_eq!(
        shown(&r.check("abcd").expect_err("long")),
        "is longer than 3 bytes"
    );
    assert_eq!(
        shown(&r.check("a\nb").expect_err("control")),
        "contains control characters"
    );
    let mut r = rule();
    r.charset = Some(Charset::parse("0-9").expect("cs"));
    assert_eq!(
        shown(&r.check("a").expect_err("charset")),
        "has characters outside [0-9]"
    );
    let mut r = rule();
    r.min = Some(5);
    assert_eq!(shown(&r.check("1").expect_err("range")), "is outside 5..=");
    assert!(matches!(
        Action::default().argv(r#"{"x":1}"#),
        Err(ArgvError::Unknown { known, .. }) if known.is_empty()
    ));
    assert_eq!(
        shown(&Action::default().argv(r#"{"x":1}"#).expect_err("unknown")),
        r#"unknown argument "x" (this action takes: none)"#
    );
}

#[test]
fn globs_never_cross_directories_or_produce_dot_dot() {
    let g = Glob::parse("/var/log/*.log");
    assert!(g.matches("/var/log/syslog.log"));
    assert!(!g.matches("/var/log/a/b.log"));
    assert!(!g.matches("/var/log/../../etc/x.log"));
    assert!(!g.matches("/var/log/.hidden.log"));
    let g = Glob::parse("/srv/*");
    assert!(!g.matches("/srv/.."));
    assert!(!g.matches("/srv/."));
    assert!(g.matches("/srv/data"));
    assert!(Glob::parse("nginx.service").matches("nginx.service"));
    assert!(!Glob::parse("nginx.service").matches("nginx.servicex"));
    assert!(Glob::parse("v?").matches("v1"));
    assert!(!Glob::parse("v?").matches("v12"));
    assert!(Glob::parse(r"a\*").matches("a*"));
    assert!(!Glob::parse(r"a\*").matches("ab"));
    assert!(Glob::parse("*a*b*c").matches("xxaxxbxxc"));
    // Pathological patterns stay fast.
    let long = "a".repeat(200);
    assert!(!Glob::parse("*a*a*a*a*a*a*a*a*b").matches(&long));
}

#[test]
fn charsets() {
    let c = Charset::parse("a-z0-9_-").expect("parse");
    assert!(c.allows("abc_1-2"));
    assert!(!c.allows("ABC"));
    assert!(!c.allows("a b"));
    assert!(matches!(
        Charset::parse("z-a"),
        Err(CharsetError::Reversed {
            from: 'z',
            to: 'a',
            ..
        })
    ));
    assert_eq!(Charset::parse(""), Err(CharsetError::Empty));
    let c = Charset::parse("-a").expect("parse");
    assert!(c.allows("-a-"));
}

#[test]
fn rules_all_apply_and_universal_checks_always_do() {
    let mut r = rule();
    r.allow = vec![Glob::parse("nginx.service"), Glob::parse("app-*.service")];
    assert!(r.check("nginx.service").is_ok());
    assert!(r.check("app-web.service").is_ok());
    assert!(matches!(
        r.check("sshd.service"),
        Err(ValueRefused::NotAllowed { allowed }) if allowed == ["nginx.service", "app-*.service"]
    ));
    let mut r = rule();
    r.charset = Some(Charset::parse("0-9").expect("cs"));
    r.min = Some(1);
    r.max = Some(100);
    assert!(r.check("42").is_ok());
    assert_eq!(
        r.check("420"),
        Err(ValueRefused::OutOfRange {
            min: Some(1),
            max: Some(100)
        })
    );
    assert!(matches!(
        r.check("4a"),
        Err(ValueRefused::OutsideCharset { .. })
    ));
    let mut r = rule();
    r.any = true;
    assert!(r.check("$(touch /tmp/x); rm -rf").is_ok());
    assert_eq!(
        r.check("--output=/etc/passwd"),
        Err(ValueRefused::LeadingDash)
    );
    assert_eq!(r.check("a\nb"), Err(ValueRefused::ControlCharacters));
    assert_eq!(
        r.check(&"x".repeat(300)),
        Err(ValueRefused::TooLong {
            max_len: DEFAULT_MAX_LEN
        })
    );
    r.allow_leading_dash = true;
    assert!(r.check("-5").is_ok());
    assert!(!rule().has_rule());
}

fn action() -> Action {
    let mut params = BTreeMap::new();
    let mut unit = rule();
    unit.allow = vec![Glob::parse("nginx.service")];
    params.insert("unit".to_string(), unit);
    let mut lines = rule();
    lines.min = Some(1);
    lines.max = Some(500);
    lines.default = Some("50".to_string());
    params.insert("lines".to_string(), lines);
    Action {
        name: "logs".to_string(),
        program: PathBuf::from("/bin/echo"),
        args: vec![
            Template::parse("-u").expect("t"),
            Template::parse("{unit}").expect("t"),
            Template::parse("--lines={lines}").expect("t"),
        ],
        params,
        timeout: Duration::from_secs(5),
        max_output: 1024,
        env: Vec::new(),
        working_dir: None,
    }
}

#[test]
fn argv_is_built_from_checked_arguments() {
    let a = action();
    assert_eq!(
        a.argv(r#"{"unit":"nginx.service"}"#).expect("argv"),
        ["-u", "nginx.service", "--lines=50"]
    );
    assert_eq!(
        a.argv(r#"{"unit":"nginx.service","lines":7}"#)
            .expect("argv"),
        ["-u", "nginx.service", "--lines=7"]
    );
    assert!(matches!(
        a.argv(r#"{"unit":"sshd"}"#),
        Err(ArgvError::Refused { name, value, reason: ValueRefused::NotAllowed { .. } })
            if name == "unit" && value == "sshd"
    ));
    assert!(matches!(
        a.argv("{}"),
        Err(ArgvError::Missing { name }) if name == "unit"
    ));
    assert!(matches!(
        a.argv(r#"{"unit":"nginx.service","x":1}"#),
        Err(ArgvError::Unknown { name, known }) if name == "x" && known == ["lines", "unit"]
    ));
    assert!(matches!(
        a.argv(r#"{"unit":["a"]}"#),
        Err(ArgvError::Args(ArgsError::ValueType { name })) if name == "unit"
    ));
    assert!(matches!(
        a.argv("[1]"),
        Err(ArgvError::Args(ArgsError::NotObject))
    ));
    assert!(matches!(
        a.argv("nope"),
        Err(ArgvError::Args(ArgsError::NotJson { .. }))
    ));
}

#[tokio::test]
async fn runs_and_reports_output_and_refusals() {
    let a = action();
    let out = a.run(r#"{"unit":"nginx.service"}"#, None).await;
    assert_eq!(out, Outcome::ok("-u nginx.service --lines=50\n"));
    let out = a.run(r#"{"unit":"x"}"#, None).await;
    assert!(!out.ok);
    assert_eq!(out.code, REFUSED);
    assert!(out.output.starts_with("refused: "), "{}", out.output);
}

#[tokio::test]
async fn long_output_is_cut_with_a_note() {
    let mut a = action();
    a.program = PathBuf::from("/bin/sh");
    a.params.clear();
    a.args = vec![
        Template::parse("-c").expect("t"),
        Template::parse("head -c 5000 /dev/zero | tr '\\0' x; exit 4").expect("t"),
    ];
    a.max_output = 1024;
    let out = a.run("{}", None).await;
    assert_eq!(out.code, 4);
    assert!(!out.ok);
    assert!(out.output.len() <= 1024);
    assert!(out.output.ends_with("[output truncated]"), "{}", out.output);
}

//! The subset of containerd's filter syntax that Walk requests use: a list of filters (any may match),
//! each a comma-separated conjunction of `FIELD==VALUE`, `FIELD!=VALUE` or a bare `FIELD` (present),
//! where FIELD is `name`, `parent`, `kind` or `labels.KEY` / `labels."KEY"`. Values may be quoted.

use std::collections::BTreeMap;

/// What a filter is checked against.
#[derive(Debug)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, PartialEq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

#[derive(Debug, PartialEq)]
struct Term {
    field: Vec<String>,
    op: Op,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1].replace("\\\"", "\"")
    } else {
        s.to_owned()
    }
}

/// Splits a field path on dots outside quotes.
fn field_path(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.trim().chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Splits on commas outside quotes.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut start) = (false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse(filter: &str) -> Result<Vec<Term>, String> {
    split_terms(filter)
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            let (field, op) = if let Some((f, v)) = t.split_once("==") {
                (f, Op::Eq(unquote(v)))
            } else if let Some((f, v)) = t.split_once("!=") {
                (f, Op::Ne(unquote(v)))
            } else if t.contains('=') || t.contains('~') {
                return Err(format!("unsupported filter operator in {t:?}"));
            } else {
                (t, Op::Present)
            };
            let field = field_path(field);
            match field.first().map(String::as_str) {
                Some("name" | "parent" | "kind") if field.len() == 1 => {}
                Some("labels") if field.len() == 2 => {}
                _ => return Err(format!("unsupported filter field in {t:?}")),
            }
            Ok(Term { field, op })
        })
        .collect()
}

/// Whether `s` matches any of `filters` (no filters match everything).
pub fn matches(filters: &[String], s: &Subject<'_>) -> Result<bool, String> {
    if filters.iter().all(|f| f.trim().is_empty()) {
        return Ok(true);
    }
    for f in filters {
        let terms = parse(f)?;
        let ok = terms.iter().all(|t| {
            let value = match t.field[0].as_str() {
                "name" => Some(s.name),
                "parent" => Some(s.parent),
                "kind" => Some(s.kind),
                _ => s.labels.get(&t.field[1]).map(String::as_str),
            };
            match (&t.op, value) {
                (Op::Present, v) => v.is_some_and(|v| !v.is_empty()),
                (Op::Eq(want), v) => v == Some(want.as_str()),
                (Op::Ne(want), v) => v != Some(want.as_str()),
            }
        });
        if ok {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_filter_forms() {
        let labels: BTreeMap<String, String> =
            [("containerd.io/gc.root".to_string(), "x".to_string())].into_iter().collect();
        let s = Subject { name: "default/1/a", parent: "", kind: "committed", labels: &labels };
        let m = |f: &[&str]| matches(&f.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &s).unwrap();
        assert!(m(&[]));
        assert!(m(&["name==default/1/a"]));
        assert!(m(&[r#"labels."containerd.io/gc.root""#]));
        assert!(m(&[r#"labels."containerd.io/gc.root"==x,kind==committed"#]));
        assert!(!m(&[r#"labels."containerd.io/gc.root"==y"#]));
        assert!(m(&["name==b", "parent==\"\""]));
        assert!(m(&["kind!=active"]));
        assert!(matches(&["name~=a".to_string()], &s).is_err());
    }
}

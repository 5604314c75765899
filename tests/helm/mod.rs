//! Renders a Helm chart without helm, for the part of Go's template language the bkpool chart
//! uses: `if`/`else`, `with`, `range`, `define` and `include`, `{{-`/`-}}` trimming, values
//! by path (`.Values.x`, `.Release.Namespace`, `.Chart.AppVersion`, `.`), parenthesized
//! pipelines and the functions `default`, `and`, `quote`, `toJson`, `toYaml`, `nindent` and
//! `.Capabilities.APIVersions.Has`. Anything else (another function, an undefined value, a
//! map printed as text) panics: nothing passes unrendered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// What `helm install -n <namespace>` knows of the cluster it installs into.
pub struct Release<'a> {
    pub namespace: &'a str,
    /// The API versions the cluster serves, as `.Capabilities.APIVersions.Has` names them
    /// (`policy/v1/PodDisruptionBudget`).
    pub api_versions: &'a [&'a str],
}

/// Every template of `chart` (but the `_` helpers) rendered with the chart's default values:
/// (template, text).
pub fn render_chart(chart: &Path, release: &Release) -> Vec<(PathBuf, String)> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let yaml = |path: &Path| -> Value {
        serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let meta = yaml(&chart.join("Chart.yaml"));
    let root = json!({
        "Values": yaml(&chart.join("values.yaml")),
        "Release": {"Namespace": release.namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]},
    });
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart.join("templates"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let mut renderer = Renderer {
        defines: BTreeMap::new(),
        api_versions: release.api_versions,
        file: String::new(),
    };
    let parsed: Vec<(PathBuf, Vec<Node>)> = files
        .into_iter()
        .map(|path| {
            let nodes = parse(&read(&path), &mut renderer.defines, &path);
            (path, nodes)
        })
        .collect();
    parsed
        .into_iter()
        .filter(|(path, _)| !path.file_name().unwrap().to_str().unwrap().starts_with('_'))
        .map(|(path, nodes)| {
            renderer.file = path.display().to_string();
            let mut out = String::new();
            renderer.render(&nodes, &root, &mut out);
            (path, out)
        })
        .collect()
}

/// Renders one template's text against `root` (the `.` of the template).
pub fn render_str(text: &str, root: &Value) -> String {
    let mut renderer = Renderer {
        defines: BTreeMap::new(),
        api_versions: &[],
        file: "template".into(),
    };
    let nodes = parse(text, &mut renderer.defines, Path::new("template"));
    let mut out = String::new();
    renderer.render(&nodes, root, &mut out);
    out
}

enum Node {
    Text(String),
    /// A pipeline whose value is printed.
    Print(String),
    If(String, Vec<Node>, Vec<Node>),
    With(String, Vec<Node>),
    Range(String, Vec<Node>),
}

enum Piece<'a> {
    Text(String),
    Action(&'a str),
}

/// Splits a template into text and actions, trimming the whitespace `{{-` and `-}}` ask to.
fn lex<'a>(mut rest: &'a str, file: &Path) -> Vec<Piece<'a>> {
    let (mut pieces, mut trim_start) = (Vec::new(), false);
    while let Some(open) = rest.find("{{") {
        let close = open
            + rest[open..]
                .find("}}")
                .unwrap_or_else(|| panic!("{}: an unclosed {{{{", file.display()));
        let mut text = &rest[..open];
        if trim_start {
            text = text.trim_start();
        }
        let mut action = &rest[open + 2..close];
        if let Some(a) = action.strip_prefix("- ") {
            (action, text) = (a, text.trim_end());
        }
        trim_start = action.ends_with(" -");
        pieces.push(Piece::Text(text.to_owned()));
        pieces.push(Piece::Action(action.trim_end_matches(" -").trim()));
        rest = &rest[close + 2..];
    }
    pieces.push(Piece::Text(
        if trim_start { rest.trim_start() } else { rest }.to_owned(),
    ));
    pieces
}

/// What closes a block.
#[derive(PartialEq, Debug)]
enum Closer {
    Else,
    End,
    EndOfFile,
}

fn parse(text: &str, defines: &mut BTreeMap<String, Vec<Node>>, file: &Path) -> Vec<Node> {
    let mut pieces = lex(text, file).into_iter();
    let (nodes, end) = block(&mut pieces, defines);
    assert_eq!(
        end,
        Closer::EndOfFile,
        "{}: an unmatched {{{{ {end:?} }}}}",
        file.display()
    );
    nodes
}

/// The nodes up to the `else` or `end` closing the block (or the end of the file).
fn block<'a>(
    pieces: &mut impl Iterator<Item = Piece<'a>>,
    defines: &mut BTreeMap<String, Vec<Node>>,
) -> (Vec<Node>, Closer) {
    let mut nodes = Vec::new();
    let body = |pieces: &mut _, defines: &mut _, what: &str| {
        let (nodes, end) = block(pieces, defines);
        assert_eq!(end, Closer::End, "{{{{ {what} }}}} is not closed");
        nodes
    };
    while let Some(piece) = pieces.next() {
        let action = match piece {
            Piece::Text(text) => {
                nodes.push(Node::Text(text));
                continue;
            }
            Piece::Action(action) => action,
        };
        let (word, arg) = action.split_once(' ').unwrap_or((action, ""));
        let arg = arg.to_owned();
        match (word, arg.as_str()) {
            ("end", "") => return (nodes, Closer::End),
            ("else", "") => return (nodes, Closer::Else),
            ("if", _) => {
                let (then, end) = block(pieces, defines);
                let otherwise = match end {
                    Closer::Else => body(pieces, defines, action),
                    Closer::End => Vec::new(),
                    Closer::EndOfFile => panic!("{{{{ {action} }}}} is not closed"),
                };
                nodes.push(Node::If(arg, then, otherwise));
            }
            ("with", _) => nodes.push(Node::With(arg, body(pieces, defines, action))),
            ("range", _) => nodes.push(Node::Range(arg, body(pieces, defines, action))),
            ("define", _) => {
                let name: String = serde_json::from_str(&arg).expect("a quoted template name");
                let nodes = body(pieces, defines, action);
                defines.insert(name, nodes);
            }
            _ => nodes.push(Node::Print(action.to_owned())),
        }
    }
    (nodes, Closer::EndOfFile)
}

struct Renderer<'a> {
    defines: BTreeMap<String, Vec<Node>>,
    api_versions: &'a [&'a str],
    /// The template being rendered, for messages.
    file: String,
}

impl Renderer<'_> {
    fn render(&self, nodes: &[Node], dot: &Value, out: &mut String) {
        for node in nodes {
            match node {
                Node::Text(text) => out.push_str(text),
                Node::Print(pipeline) => out.push_str(&self.print(pipeline, dot)),
                Node::If(cond, then, otherwise) => {
                    let taken = if truthy(&self.pipeline(cond, dot)) {
                        then
                    } else {
                        otherwise
                    };
                    self.render(taken, dot, out);
                }
                Node::With(value, body) => {
                    let value = self.pipeline(value, dot);
                    if truthy(&value) {
                        self.render(body, &value, out);
                    }
                }
                Node::Range(list, body) => match self.pipeline(list, dot) {
                    Value::Array(items) => items.iter().for_each(|i| self.render(body, i, out)),
                    other => panic!("{}: range over {other}", self.file),
                },
            }
        }
    }

    fn print(&self, pipeline: &str, dot: &Value) -> String {
        match self.pipeline(pipeline, dot) {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => panic!("{}: {{{{ {pipeline} }}}} prints {other}", self.file),
        }
    }

    /// `a | f x | g`: each command's value is the last argument of the next.
    fn pipeline(&self, pipeline: &str, dot: &Value) -> Value {
        let mut piped = None;
        for command in split(pipeline, |c| c == '|') {
            let words = split(command, char::is_whitespace);
            let mut args: Vec<Value> = words[1..].iter().map(|w| self.term(w, dot)).collect();
            args.extend(piped.take());
            piped =
                Some(self.call(words[0], &args, dot).unwrap_or_else(|| {
                    panic!("{}: cannot render {{{{ {pipeline} }}}}", self.file)
                }));
        }
        piped.unwrap_or_else(|| panic!("{}: an empty {{{{ }}}}", self.file))
    }

    fn call(&self, name: &str, args: &[Value], dot: &Value) -> Option<Value> {
        let string = |s: String| Some(Value::String(s));
        match (name, args) {
            (_, []) => Some(self.term(name, dot)),
            ("include", [Value::String(template), dot]) => {
                let nodes = self.defines.get(template)?;
                let mut out = String::new();
                self.render(nodes, dot, &mut out);
                string(out)
            }
            ("default", [fallback, value]) => {
                Some(if truthy(value) { value } else { fallback }.clone())
            }
            ("and", [a, b]) => Some(if truthy(a) { b } else { a }.clone()),
            ("quote", [Value::String(s)]) => string(Value::String(s.clone()).to_string()),
            ("toJson", [value]) => string(value.to_string()),
            ("toYaml", [value]) => string(serde_yaml::to_string(value).ok()?.trim_end().into()),
            ("nindent", [Value::Number(n), Value::String(s)]) => {
                let pad = " ".repeat(n.as_u64()? as usize);
                string(format!("\n{pad}{}", s.replace('\n', &format!("\n{pad}"))))
            }
            (".Capabilities.APIVersions.Has", [Value::String(api)]) => {
                Some(Value::Bool(self.api_versions.contains(&api.as_str())))
            }
            _ => None,
        }
    }

    /// A value: `.`, a path from `.`, a string, a number or a parenthesized pipeline.
    fn term(&self, word: &str, dot: &Value) -> Value {
        if word == "." {
            return dot.clone();
        }
        if let Some(path) = word.strip_prefix('.') {
            let found = path.split('.').try_fold(dot, |v, key| v.get(key));
            let found = found.unwrap_or_else(|| panic!("{}: {word} is not defined", self.file));
            return found.clone();
        }
        if let Some(inner) = word.strip_prefix('(').and_then(|w| w.strip_suffix(')')) {
            return self.pipeline(inner, dot);
        }
        if word.starts_with('"') {
            return serde_json::from_str(word).unwrap();
        }
        match word.parse::<u64>() {
            Ok(n) => n.into(),
            Err(_) => panic!("{}: cannot render {word}", self.file),
        }
    }
}

/// Go's truth: false, 0, "", nil and empty lists and maps are false.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Splits at `sep` outside strings and parentheses, dropping empty parts.
fn split(text: &str, sep: impl Fn(char) -> bool) -> Vec<&str> {
    let (mut parts, mut start, mut depth, mut quoted) = (Vec::new(), 0, 0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            c if sep(c) && !quoted && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

#[test]
fn the_renderer_renders_the_constructs_the_chart_uses() {
    let root = json!({"Values": {"names": ["a", "b"], "empty": "", "map": {"k": "v"}, "n": 7}});
    let text = r#"{{- define "x" -}} [{{ . }}] {{- end }}
r:{{- range .Values.names }}{{ include "x" . }}{{- end }}
i: {{ if and .Values.n .Values.empty }}yes{{ else }}no{{ end }}
w: {{- with .Values.empty }} {{ . }}{{- end }}
d: {{ .Values.empty | default "fallback" | quote }}
m: {{- toYaml .Values.map | nindent 2 }}
j: {{ toJson .Values.map }} {{ (.Values.n) }}
"#;
    let expected = "\nr:[a][b]\ni: no\nw:\nd: \"fallback\"\nm:\n  k: v\nj: {\"k\":\"v\"} 7\n";
    assert_eq!(render_str(text, &root), expected);
}

#[test]
#[should_panic(expected = "cannot render {{ lookup \"v1\" \"Secret\" }}")]
fn the_renderer_refuses_a_function_it_does_not_know() {
    render_str(r#"{{ lookup "v1" "Secret" }}"#, &json!({}));
}

#[test]
#[should_panic(expected = ".Values.missing is not defined")]
fn the_renderer_refuses_an_undefined_value() {
    render_str("{{ .Values.missing }}", &json!({"Values": {}}));
}

#[test]
#[should_panic(expected = "{{ if .Values.on }} is not closed")]
fn the_renderer_refuses_an_unclosed_block() {
    render_str("{{ if .Values.on }}x", &json!({"Values": {"on": true}}));
}

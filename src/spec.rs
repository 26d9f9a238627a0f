//! The probe spec grammar, shared by `UPROBES`, `uprobe run -p` and the control socket:
//!
//! ```text
//! OBJECT:SYMBOL            function entry; SYMBOL may be a glob (* ? [...]) or name@VERSION
//! OBJECT:SYMBOL+OFFSET     an instruction inside it (decimal or 0x hex), on an instruction boundary
//! OBJECT:0xADDRESS         a file virtual address, as readelf prints it
//! ...(TYPE,...)            any of the above with typed arguments for traced events:
//!                          str int i32 u32 long i64 u64 x64 ptr (at most 6)
//! ```
//!
//! Several specs are separated by `;`, `,` or white space (not inside `(...)` or `[...]`).

/// What a spec points at inside its object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Symbol { pattern: String, offset: u64 },
    Address(u64),
}

/// A parsed spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// As the user typed it.
    pub text: String,
    pub object: String,
    pub target: Target,
    /// Types of the first arguments, shown in traced events.
    pub args: Vec<ArgType>,
    /// `%return`: fire when the function returns (its entry is where the breakpoint goes).
    pub ret: bool,
    /// `%stack`: count the user stack of each hit.
    pub stack: bool,
}

pub use crate::sigsafe::consumer::ArgType;

fn parse_arg_type(s: &str) -> Option<ArgType> {
    Some(match s {
        "str" | "string" => ArgType::Str,
        "int" | "i32" => ArgType::I32,
        "u32" => ArgType::U32,
        "long" | "i64" => ArgType::I64,
        "u64" => ArgType::U64,
        "x64" | "ptr" => ArgType::Hex,
        _ => return None,
    })
}

impl Spec {
    /// The symbol part for display: the pattern, or the address.
    pub fn symbol_text(&self) -> String {
        match &self.target {
            Target::Symbol { pattern, .. } => pattern.clone(),
            Target::Address(a) => format!("{a:#x}"),
        }
    }
}

/// Why a spec could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed spec `{}`: {why} (expected OBJECT:SYMBOL, OBJECT:SYMBOL+OFFSET or OBJECT:0xADDRESS)",
    crate::spec::shorten(spec)
)]
pub struct SpecError {
    pub spec: String,
    pub why: String,
}

/// At most 200 characters of `s` (a message must stay readable whatever was typed).
pub fn shorten(s: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 200;
    if s.chars().count() <= MAX {
        return s.into();
    }
    let cut: String = s.chars().take(MAX).collect();
    format!("{cut}... ({} characters)", s.chars().count()).into()
}

/// Split a list of specs on `;`, `,` and white space outside brackets.
pub fn split_specs(list: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ';' | ',' if depth <= 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            c if c.is_whitespace() && depth <= 0 => {
                out.push(&list[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&list[start..]);
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

pub fn parse(text: &str) -> Result<Spec, SpecError> {
    let err = |why: &str| SpecError { spec: text.to_string(), why: why.to_string() };
    let t = text.trim();
    // Modifiers at the end, in any order: `%return`, `%stack`.
    let (mut t_no_ret, mut ret, mut stack) = (t, false, false);
    loop {
        if let Some(rest) = t_no_ret.strip_suffix("%return").filter(|_| !ret) {
            (t_no_ret, ret) = (rest, true);
        } else if let Some(rest) = t_no_ret.strip_suffix("%stack").filter(|_| !stack) {
            (t_no_ret, stack) = (rest, true);
        } else {
            break;
        }
    }
    let (t_target, args) = match t_no_ret.split_once('(') {
        Some((head, tail)) => {
            let list =
                tail.strip_suffix(')').ok_or_else(|| err("unclosed `(` in argument types"))?;
            let mut args = Vec::new();
            for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                args.push(parse_arg_type(a).ok_or_else(|| {
                    err(&format!(
                        "unknown argument type `{}` (str, int, i32, u32, long, i64, u64, x64, ptr)",
                        shorten(a)
                    ))
                })?);
            }
            if args.len() > 6 {
                return Err(err("at most 6 argument types (the SysV integer argument registers)"));
            }
            (head, args)
        }
        None => (t_no_ret, Vec::new()),
    };
    let (object, rest) =
        t_target.split_once(':').ok_or_else(|| err("no `:` between object and symbol"))?;
    if object.is_empty() {
        return Err(err("empty object"));
    }
    if rest.is_empty() {
        return Err(err("empty symbol"));
    }
    if t_target.contains('%') {
        return Err(err(
            "unknown or repeated `%` modifier (`%return` and `%stack`, once each, at the end)",
        ));
    }
    if rest.chars().any(|c| c.is_whitespace() || c == ':') {
        return Err(err("unexpected character in symbol"));
    }
    let target = if rest.starts_with("0x") || rest.starts_with("0X") {
        Target::Address(parse_number(rest).ok_or_else(|| err("bad hex address"))?)
    } else {
        let (pattern, offset) = match rest.split_once('+') {
            Some((p, o)) => {
                (p, parse_number(o).ok_or_else(|| err("offset must be decimal or 0x hex"))?)
            }
            None => (rest, 0),
        };
        if pattern.is_empty() {
            return Err(err("empty symbol"));
        }
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(err("a symbol cannot start with a digit (addresses are 0x hex)"));
        }
        if !glob_is_valid(pattern) {
            return Err(err("unclosed `[` in symbol pattern"));
        }
        Target::Symbol { pattern: pattern.to_string(), offset }
    };
    if ret {
        if let Target::Symbol { offset, .. } = &target {
            if *offset != 0 {
                return Err(err(
                    "a return probe goes on a function's entry: no +OFFSET with %return",
                ));
            }
        }
    }
    Ok(Spec { text: t.to_string(), object: object.to_string(), target, args, ret, stack })
}

fn glob_is_valid(p: &str) -> bool {
    let mut open = false;
    for c in p.chars() {
        match c {
            '[' if !open => open = true,
            ']' if open => open = false,
            _ => {}
        }
    }
    !open
}

/// Shell-style glob: `*`, `?`, `[abc]`, `[a-z]`, `[!a]`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    // A plain name (the usual spec) is an equality: matching it against every symbol of libc
    // char by char, with two vectors each, was a tenth of a process's setup.
    if !pattern.contains(['*', '?', '[']) {
        return pattern == name;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(pi + 1),
            Some('[') => class_match(&p, pi, n[ni]),
            Some(&c) if c == n[ni] => Some(pi + 1),
            _ => None,
        };
        match step {
            Some(next) => {
                pi = next;
                ni += 1;
            }
            None => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Match `c` against the class starting at `p[at] == '['`; the index after `]` if it matches.
fn class_match(p: &[char], at: usize, c: char) -> Option<usize> {
    let mut i = at + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while let Some(&pc) = p.get(i) {
        if pc == ']' && !first {
            return (hit != negate).then_some(i + 1);
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
            hit |= pc <= c && c <= p[i + 2];
            i += 3;
        } else {
            hit |= pc == c;
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a case expects: (object, target), or a fragment of the error message.
    type Expected = Result<(String, Target), String>;

    fn sym(o: &str, p: &str, off: u64) -> Expected {
        Ok((o.into(), Target::Symbol { pattern: p.into(), offset: off }))
    }

    #[test]
    fn parses_the_grammar() {
        let cases: &[(&str, Expected)] = &[
            ("libc.so.6:malloc", sym("libc.so.6", "malloc", 0)),
            ("libc:str*", sym("libc", "str*", 0)),
            ("app:work+12", sym("app", "work", 12)),
            ("app:work+0x1f", sym("app", "work", 0x1f)),
            ("/usr/lib/libz.so.1:inflate", sym("/usr/lib/libz.so.1", "inflate", 0)),
            ("libc.so.6:memcpy@GLIBC_2.2.5", sym("libc.so.6", "memcpy@GLIBC_2.2.5", 0)),
            ("app:0x1139", Ok(("app".into(), Target::Address(0x1139)))),
            ("malloc", Err("no `:`".into())),
            (":malloc", Err("empty object".into())),
            ("libc:", Err("empty symbol".into())),
            ("libc:+4", Err("empty symbol".into())),
            ("libc:f+zz", Err("offset must be".into())),
            ("libc:0xzz", Err("bad hex".into())),
            ("libc:12", Err("cannot start with a digit".into())),
            ("libc:f[a", Err("unclosed".into())),
            ("libc:open(str,int", Err("unclosed `(`".into())),
            ("libc:open(str,float)", Err("unknown argument type `float`".into())),
            ("libc:f(int,int,int,int,int,int,int)", Err("at most 6".into())),
            ("libc:malloc%return", sym("libc", "malloc", 0)),
            ("libc:malloc+4%return", Err("no +OFFSET with %return".into())),
            ("libc:open(str, int)", sym("libc", "open", 0)),
        ];
        for (text, want) in cases {
            let got = parse(text).map(|s| (s.object, s.target)).map_err(|e| e.to_string());
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(&g, w, "{text}"),
                (Err(g), Err(w)) => assert!(g.contains(w.as_str()), "{text}: {g}"),
                (g, w) => panic!("{text}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn splits_lists() {
        assert_eq!(split_specs("a:b;c:d, e:f  g:h\n"), ["a:b", "c:d", "e:f", "g:h"]);
        assert_eq!(split_specs("libc:open(str,int);x:[a,b]*"), ["libc:open(str,int)", "x:[a,b]*"]);
        assert!(split_specs(" ;, ").is_empty());
        let s = parse("libc:open(str, int)").unwrap();
        assert_eq!(s.args, [ArgType::Str, ArgType::I32]);
        assert_eq!(parse("libc:malloc(u64)").unwrap().args, [ArgType::U64]);
        assert!(parse("libc:malloc").unwrap().args.is_empty());
        let r = parse("libc:read(int,ptr,u64)%return").unwrap();
        assert!(r.ret);
        assert_eq!(r.args.len(), 3);
        assert!(!parse("libc:read").unwrap().ret);
        for text in ["libc:malloc%return%stack", "libc:malloc%stack%return"] {
            let m = parse(text).unwrap();
            assert!(m.ret && m.stack, "{text}");
            assert_eq!(m.target, Target::Symbol { pattern: "malloc".into(), offset: 0 });
        }
        let s = parse("libc:open(str,int)%stack").unwrap();
        assert!(s.stack && !s.ret && s.args.len() == 2);
        assert!(parse("libc:malloc%stack%stack").is_err(), "a modifier once");
        assert!(parse("libc:malloc+4%stack").unwrap().stack, "any instruction may take a stack");
    }

    #[test]
    fn globs() {
        let cases = [
            ("str*", "strlen", true),
            ("str*", "memcpy", false),
            ("*", "", true),
            ("f?o", "foo", true),
            ("f?o", "fo", false),
            ("foo_[ab]", "foo_b", true),
            ("foo_[!ab]", "foo_b", false),
            ("foo_[a-c]x", "foo_cx", true),
            ("*_chk", "__memcpy_chk", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("malloc", "malloc", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n), want, "{p} vs {n}");
        }
    }

    /// A deterministic generator for the fuzz tests (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Arbitrary text: bytes of every kind, the grammar's own characters often, any length.
    fn arbitrary(rng: &mut Rng) -> String {
        const PIECES: &[&str] = &[
            ":",
            "+",
            "%return",
            "(",
            ")",
            ",",
            ";",
            " ",
            "[",
            "]",
            "*",
            "?",
            "!",
            "-",
            "0x",
            "@",
            "@@",
            "str",
            "int",
            "libc.so.6",
            "malloc",
            "\u{0}",
            "\n",
            "é",
            "\u{10ffff}",
        ];
        let len = match rng.below(10) {
            0 => rng.below(100_000),
            1..=3 => 0,
            _ => rng.below(40),
        };
        let mut s = String::new();
        while s.len() < len as usize {
            if rng.below(3) == 0 {
                s.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]);
            } else if let Some(c) = char::from_u32(rng.below(0x11_0000) as u32) {
                s.push(c);
            }
        }
        s
    }

    /// No input may panic the parser (fixed seed, bounded run).
    #[test]
    fn fuzz_the_parser() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for _ in 0..20_000 {
            let text = arbitrary(&mut rng);
            for piece in split_specs(&text) {
                if let Ok(spec) = parse(piece) {
                    assert!(!spec.object.is_empty());
                    let _ = spec.symbol_text();
                    if let Target::Symbol { pattern, .. } = &spec.target {
                        let _ = glob_match(pattern, "malloc");
                    }
                }
                if let Err(e) = parse(piece) {
                    let m = e.to_string();
                    assert!(
                        m.chars().count() < 600,
                        "a message stays readable: {}",
                        &m[..m.floor_char_boundary(300)]
                    );
                }
            }
        }
    }
}

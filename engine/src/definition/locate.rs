//! Where every node of a parsed document sits in its source text.
//!
//! serde-saphyr reports locations for syntax and type errors, but semantic checks run on the
//! typed model, which keeps none. Rather than wrap every model field in `Spanned<T>` (it would
//! leak into the store and the API), the document is parsed a second time into this small tree
//! of positions, and checks look nodes up by path (`steps`, 2, `needs`, 0).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

/// A 1-based (line, column).
pub(crate) type Pos = (usize, usize);

/// Used where nothing better is known (whole-file problems); still a real place in the file.
pub(crate) const START: Pos = (1, 1);

pub(crate) fn pos(loc: Location) -> Option<Pos> {
    if loc == Location::UNKNOWN || loc.line() == 0 {
        return None;
    }
    let line = usize::try_from(loc.line()).ok()?;
    let column = usize::try_from(loc.column()).ok()?.max(1);
    Some((line, column))
}

/// One step of a path into the document.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

#[derive(Debug, Default)]
pub(crate) struct LocNode {
    at: Option<Pos>,
    children: Children,
}

#[derive(Debug, Default)]
enum Children {
    #[default]
    Leaf,
    /// (key, where the key is, the value)
    Map(Vec<(String, Option<Pos>, LocNode)>),
    Seq(Vec<LocNode>),
}

impl LocNode {
    /// The node at `path`. When the path leaves the tree (e.g. `schedule.cron` where the source
    /// used the bare-string shorthand) the deepest node reached is used, so an error still points
    /// at the closest thing the user wrote. With `key`, a final map entry answers with the position
    /// of its key rather than its value.
    pub(crate) fn find(&self, path: &[Seg<'_>], key: bool) -> Option<Pos> {
        let mut node = self;
        let mut best = self.at;
        for (i, seg) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            let next = match (&node.children, seg) {
                (Children::Map(entries), Seg::Key(k)) => {
                    match entries.iter().find(|(name, _, _)| name == k) {
                        Some((_, key_at, value)) => {
                            if last && key {
                                return key_at.or(value.at).or(best);
                            }
                            Some(value)
                        }
                        None => None,
                    }
                }
                (Children::Seq(items), Seg::Index(i)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(n) => {
                    node = n;
                    best = n.at.or(best);
                }
                None => break,
            }
        }
        best
    }

    /// The keys of a map node, with their positions.
    pub(crate) fn keys(&self, path: &[Seg<'_>]) -> Vec<(&str, Option<Pos>)> {
        let mut node = self;
        for seg in path {
            let next = match (&node.children, seg) {
                (Children::Map(entries), Seg::Key(k)) => {
                    entries.iter().find(|(n, _, _)| n == k).map(|(_, _, v)| v)
                }
                (Children::Seq(items), Seg::Index(i)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return Vec::new(),
            }
        }
        match &node.children {
            Children::Map(entries) => entries.iter().map(|(k, at, _)| (k.as_str(), *at)).collect(),
            _ => Vec::new(),
        }
    }
}

impl<'de> Deserialize<'de> for LocNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Children>::deserialize(d)?;
        Ok(LocNode {
            at: pos(spanned.referenced),
            children: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for Children {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ChildrenVisitor)
    }
}

struct ChildrenVisitor;

macro_rules! leaf {
    ($($name:ident: $ty:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $ty) -> Result<Children, E> { Ok(Children::Leaf) })*
    };
}

impl<'de> Visitor<'de> for ChildrenVisitor {
    type Value = Children;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    leaf!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
          visit_f64: f64, visit_str: &str, visit_bytes: &[u8], visit_char: char);

    fn visit_unit<E: de::Error>(self) -> Result<Children, E> {
        Ok(Children::Leaf)
    }

    fn visit_none<E: de::Error>(self) -> Result<Children, E> {
        Ok(Children::Leaf)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Children, D::Error> {
        Children::deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Children, D::Error> {
        Children::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Children, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<LocNode>()? {
            items.push(item);
        }
        Ok(Children::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Children, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = map.next_value::<LocNode>()?;
            entries.push((key.value.0, pos(key.referenced), value));
        }
        Ok(Children::Map(entries))
    }
}

/// A mapping key as text; complex keys (maps, lists) are never valid in the format, so their
/// content does not matter.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = KeyText;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
        Ok(KeyText(v.to_owned()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
        Ok(KeyText("null".to_owned()))
    }
    fn visit_none<E: de::Error>(self) -> Result<KeyText, E> {
        Ok(KeyText("null".to_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyText, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(KeyText(String::new()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyText, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(KeyText(String::new()))
    }
}

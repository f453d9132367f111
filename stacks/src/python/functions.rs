//! Interning of Python functions into small ids, so the profiler aggregates stacks as vectors
//! of integers and keeps each name once.
//!
//! A function is identified by `(qualified name, file name, first line)`: the same function in
//! two processes (e.g. the workers of one server) gets one id, while two functions of the same
//! name in one file (redefinitions, `lambda`s) stay apart by their first line.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A Python function as profiles name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Function {
    /// `co_qualname` (3.11+), `co_name` (3.10).
    pub qualname: Arc<str>,
    /// `co_filename`.
    pub filename: Arc<str>,
    /// `co_firstlineno`.
    pub first_line: u32,
}

/// Index of a [`Function`] in a [`FunctionTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionId(pub u32);

/// The interner. Ids are dense from 0 in insertion order and never reused; the table only
/// grows, so its owner rebuilds it (with [`FunctionTable::clear`]) when it starts a new
/// aggregation window.
#[derive(Debug, Default)]
pub struct FunctionTable {
    ids: HashMap<Function, FunctionId>,
    list: Vec<Function>,
    /// One shared copy of each distinct string (file names repeat across functions).
    strings: HashSet<Arc<str>>,
}

impl FunctionTable {
    pub fn new() -> FunctionTable {
        FunctionTable::default()
    }

    /// Shares one allocation per distinct string.
    pub fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(k) = self.strings.get(s) {
            return k.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    /// The id of `(qualname, filename, first_line)`, adding it if new.
    pub fn intern(&mut self, qualname: &str, filename: &str, first_line: u32) -> FunctionId {
        let f = Function {
            qualname: self.string(qualname),
            filename: self.string(filename),
            first_line,
        };
        if let Some(&id) = self.ids.get(&f) {
            return id;
        }
        let id = FunctionId(self.list.len() as u32);
        self.list.push(f.clone());
        self.ids.insert(f, id);
        id
    }

    pub fn get(&self, id: FunctionId) -> Option<&Function> {
        self.list.get(id.0 as usize)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Forgets every function (ids restart from 0).
    pub fn clear(&mut self) {
        self.ids.clear();
        self.list.clear();
        self.strings.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_by_name_file_and_first_line() {
        let mut t = FunctionTable::new();
        let a = t.intern("Klass.method", "/app/x.py", 10);
        let b = t.intern("Klass.method", "/app/x.py", 10);
        let c = t.intern("Klass.method", "/app/x.py", 20);
        let d = t.intern("Klass.method", "/app/y.py", 10);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!((a.0, c.0, d.0), (0, 1, 2));
        assert_eq!(t.len(), 3);
        let f = t.get(a).unwrap();
        assert_eq!(
            (&*f.qualname, &*f.filename, f.first_line),
            ("Klass.method", "/app/x.py", 10)
        );
        // File names are shared, not copied per function.
        assert!(Arc::ptr_eq(
            &t.get(a).unwrap().filename,
            &t.get(c).unwrap().filename
        ));
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.intern("f", "g", 1), FunctionId(0));
    }
}

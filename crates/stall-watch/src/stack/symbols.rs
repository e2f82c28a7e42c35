//! From addresses to function, file and line, with a cache.
//!
//! addr2line reads each module's DWARF (the release profile keeps
//! `debug = "line-tables-only"`, enough for function names, files, lines and
//! inlined calls) and, for a module without debug information such as libc,
//! falls back to its symbol table (`.symtab`, else `.dynsym`). A module's
//! DWARF is opened the first time one of its addresses is looked up; each
//! address's frames are then cached, so the second stall in the same code
//! costs a hash lookup per frame.
//!
//! All of this runs on the watcher (or admin) thread, never in the signal
//! handler: it allocates, and addr2line takes no care to be signal-safe.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use object::Object;

use super::unwind::{LoadedModule, StackWalker, loaded_modules};
use super::{Frame, RawStack};

/// Addresses whose frames are kept; past this the cache starts over.
const MAX_CACHED: usize = 65_536;

/// A module and its DWARF, opened on first use (`None` inside: unreadable).
struct Module {
    loaded: LoadedModule,
    dwarf: Option<Option<addr2line::Loader>>,
}

/// The unwinder and the symbol cache of one sampler.
pub(super) struct Symbolizer {
    modules: Vec<Module>,
    walker: StackWalker,
    /// Address to look up → its frames (more than one when calls were
    /// inlined there), innermost first.
    by_address: HashMap<u64, Arc<[Frame]>>,
}

impl Symbolizer {
    /// Lists the modules and reads their unwind tables: the expensive part,
    /// done once.
    pub(super) fn new() -> Self {
        let loaded = loaded_modules();
        let walker = StackWalker::new(&loaded);
        Self {
            modules: loaded
                .into_iter()
                .map(|loaded| Module {
                    loaded,
                    dwarf: None,
                })
                .collect(),
            walker,
            by_address: HashMap::new(),
        }
    }

    #[cfg(test)]
    /// Opens the executable's DWARF and builds its address index by looking
    /// up one of its own functions, so the first stall does not pay for it.
    pub(super) fn warm_up(&mut self) {
        // One function of this crate, and one of std, whose compilation
        // units are the largest to parse and in nearly every stack.
        let known = [
            Self::warm_up as *const () as u64,
            std::thread::sleep as *const () as u64,
        ];
        for address in known {
            if !self.by_address.contains_key(&address) {
                let frames = self.resolve(address).into();
                self.by_address.insert(address, frames);
            }
        }
    }

    /// The frames of `raw`, innermost first; see [`super::Sampler::symbolize`].
    pub(super) fn symbolize(&mut self, raw: &RawStack) -> Vec<Frame> {
        if !self.modules.iter().any(|m| m.loaded.contains(raw.pc)) {
            // Code outside every known module: loaded since (dlopen), or
            // generated at run time. Listing is cheap; reading unwind tables
            // is not, so start over only if the list did change.
            let now = loaded_modules();
            let same = now.len() == self.modules.len()
                && now
                    .iter()
                    .zip(&self.modules)
                    .all(|(a, b)| a.bias == b.loaded.bias && a.path == b.loaded.path);
            if !same {
                *self = Self::new();
            }
        }
        if self.by_address.len() > MAX_CACHED {
            // Stalls in ever new code: forget rather than grow without bound.
            self.by_address.clear();
        }
        let addresses = self.walker.walk(raw);
        let mut frames = Vec::with_capacity(addresses.len() * 2);
        for address in addresses {
            let resolved = match self.by_address.get(&address) {
                Some(cached) => cached.clone(),
                None => {
                    let resolved: Arc<[Frame]> = self.resolve(address).into();
                    self.by_address.insert(address, resolved.clone());
                    resolved
                }
            };
            frames.extend(resolved.iter().cloned());
        }
        // Keep the names, not the debug info: a module's DWARF is mapped
        // and indexed to name new addresses, then let go, so a service
        // holds it (its file pages are most of the binary: about 100 MB of
        // resident memory for a 90 MB release binary) only while a new
        // stack is named. Repeated stalls hit the cache above.
        for module in &mut self.modules {
            module.dwarf = None;
        }
        frames
    }

    /// Addresses with cached frames.
    pub(super) fn cached(&self) -> usize {
        self.by_address.len()
    }

    fn resolve(&mut self, address: u64) -> Vec<Frame> {
        let unknown = || {
            vec![Frame {
                function: format!("{address:#x}"),
                file: None,
                line: None,
                user_code: false,
            }]
        };
        let Some(module) = self.modules.iter_mut().find(|m| m.loaded.contains(address)) else {
            return unknown();
        };
        let probe = address.wrapping_sub(module.loaded.bias);
        let system = module.loaded.system;
        let dwarf = module.dwarf.get_or_insert_with(|| {
            module
                .loaded
                .path
                .as_ref()
                .and_then(|path| addr2line::Loader::new(path).ok())
        });
        // Neither DWARF nor symbol: the module's file name and the offset,
        // which `addr2line -e` or a debug-symbol package can resolve later.
        let anonymous = |module: &Module| {
            vec![Frame {
                function: format!("{}+{probe:#x}", module.loaded.name),
                file: None,
                line: None,
                user_code: false,
            }]
        };
        let Some(dwarf) = dwarf else {
            // The vDSO: no file, but its symbol table is in memory.
            return module
                .loaded
                .image
                .and_then(|image| {
                    let object = object::File::parse(image).ok()?;
                    let symbols = object.symbol_map();
                    let symbol = symbols.containing(probe)?;
                    Some(vec![Frame {
                        function: symbol.name().to_owned(),
                        file: None,
                        line: None,
                        user_code: false,
                    }])
                })
                .unwrap_or_else(|| anonymous(module));
        };
        let mut frames = Vec::new();
        if let Ok(mut iter) = dwarf.find_frames(probe) {
            while let Ok(Some(frame)) = iter.next() {
                let function = frame
                    .function
                    .as_ref()
                    .and_then(|f| f.demangle().ok())
                    .map(Cow::into_owned);
                let file = frame
                    .location
                    .as_ref()
                    .and_then(|l| l.file)
                    .map(str::to_owned);
                let line = frame.location.as_ref().and_then(|l| l.line);
                let Some(function) = function.map(without_generic_arguments) else {
                    continue;
                };
                let user_code = !system && file.as_deref().is_some_and(is_user_file);
                frames.push(Frame {
                    function,
                    file,
                    line,
                    user_code,
                });
            }
        }
        if frames.is_empty() {
            // No DWARF for this address: the symbol table's name.
            if let Some(symbol) = dwarf.find_symbol(probe) {
                frames.push(Frame {
                    function: addr2line::demangle_auto(Cow::Borrowed(symbol), None).into_owned(),
                    file: None,
                    line: None,
                    user_code: false,
                });
            } else {
                return anonymous(module);
            }
        }
        frames
    }
}

/// `poll<F, S>` → `poll`: with `line-tables-only` debug information (the
/// release profile), an inlined function is named by its last path segment
/// with its generic arguments spelled out in full, often hundreds of
/// characters of future types. The file and line say where it is; the
/// arguments are dropped. Qualified paths (`<T as Trait>::f`,
/// `LocalKey<T>::with`) are left alone.
pub(super) fn without_generic_arguments(mut name: String) -> String {
    if name.starts_with('<') || !name.ends_with('>') {
        return name;
    }
    let mut depth = 0usize;
    for (at, c) in name.char_indices().rev() {
        match c {
            '>' => depth += 1,
            '<' => {
                depth -= 1;
                if depth == 0 {
                    if at > 0 {
                        name.truncate(at);
                    }
                    return name;
                }
            }
            _ => {}
        }
    }
    name
}

/// Whether a source file is the application's own: not Rust's standard
/// library (`/rustc/<hash>/library/…` in the shipped std, `…/rustlib/src/…`
/// with rust-src) and not a dependency from the cargo registry or a git
/// checkout.
pub(super) fn is_user_file(file: &str) -> bool {
    const NOT_USER: &[&str] = &[
        "/rustc/",
        "/rustlib/src/",
        "library/std/",
        "library/core/",
        "library/alloc/",
        "library/panic_unwind/",
        "library/proc_macro/",
        "/.cargo/registry/",
        "/.cargo/git/",
        "/cargo/registry/",
        "/cargo/git/",
    ];
    !NOT_USER.iter().any(|marker| file.contains(marker)) && !file.starts_with("library/")
}

//! From addresses to function, file and line, with a cache.
//!
//! The release profile keeps `debug = "line-tables-only"`: enough DWARF for
//! function names, files, lines and inlined calls. A module without it, such
//! as libc, is named from its symbol table (`.symtab`, else `.dynsym`).
//!
//! Naming new code fast without holding the whole DWARF: each module is
//! indexed once, in the background ([`Symbolizer::prepare`]): for each
//! compilation unit, the lowest and highest address of its code and where
//! it is in `.debug_info` (about 50 KB for stall-lab's 3,800 units). That
//! pass touches every unit and most of `.debug_ranges`, so it reads through
//! a second mapping whose pages it lets go as it goes. A naming then reads
//! only the units holding its new addresses, each once for all of them
//! ([`super::dwarf`]). Each address's frames are cached, so a second stall
//! in the same code costs a hash lookup per frame.
//!
//! All of this runs on the namer thread, never in the signal handler: it
//! allocates, and nothing here takes care to be signal-safe.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use addr2line::gimli;
use object::{Object, ObjectSection};

use super::dwarf::{DwarfFrame, Frames, Slice};
use super::index::Index;
use super::unwind::{LoadedModule, StackWalker, loaded_modules};
use super::{Frame, RawStack};

/// Addresses whose frames are kept; past this the cache starts over.
const MAX_CACHED: usize = 65_536;

/// While indexing, the pages read are let go after this many units.
const UNITS_PER_RELEASE: usize = 128;

/// Units added to a module's function and line index per step: a step
/// takes a few milliseconds, so a capture waits at most that long.
const UNITS_PER_STEP: usize = 8;

/// A module and its debug information, indexed on first use (`None`
/// inside: unreadable).
struct Module {
    loaded: LoadedModule,
    debug: Option<Option<DebugInfo>>,
}

/// Where one compilation unit's code lies (file addresses), and the unit.
#[derive(Debug, Clone, Copy)]
struct UnitSpan {
    start: u64,
    end: u64,
    /// Offset of its header in `.debug_info`.
    offset: usize,
}

/// One module's DWARF, mapped, and its unit index.
struct DebugInfo {
    map: &'static memmap2::Mmap,
    object: object::File<'static, &'static [u8]>,
    endian: gimli::RunTimeEndian,
    /// Units with code, by their lowest address.
    spans: Vec<UnitSpan>,
    /// Every unit's header offset, sorted: references between units land
    /// in one of them.
    offsets: Vec<usize>,
    /// The symbol table, read when a frame has no DWARF.
    symbols: Option<object::SymbolMap<object::SymbolMapName<'static>>>,
    /// Each function's and line sequence's addresses: used once complete.
    index: Index,
    /// While `index` is being built: the units left, and the mapping they
    /// are read through (its pages let go after each step).
    indexing: Option<Indexing>,
}

struct Indexing {
    passing: memmap2::Mmap,
    left: Vec<usize>,
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
    /// Lists the modules and reads their unwind tables.
    pub(super) fn new() -> Self {
        let loaded = loaded_modules();
        let walker = StackWalker::new(&loaded);
        Self {
            modules: loaded
                .into_iter()
                .map(|loaded| Module {
                    loaded,
                    debug: None,
                })
                .collect(),
            walker,
            by_address: HashMap::new(),
        }
    }

    /// Indexes every module's debug information now, so that the first
    /// stall pays only for the units its stack is in.
    pub(super) fn prepare(&mut self) {
        for module in &mut self.modules {
            module.debug_info();
        }
    }

    /// Adds a few units to the first module whose function and line index
    /// is not complete; says whether any module has units left.
    pub(super) fn index_step(&mut self) -> bool {
        let mut indexing = self
            .modules
            .iter_mut()
            .filter_map(|m| m.debug.as_mut()?.as_mut())
            .filter(|d| d.indexing.is_some());
        match indexing.next() {
            Some(debug) => debug.index_step() || indexing.next().is_some(),
            None => false,
        }
    }

    /// Bytes held by the function and line indexes.
    pub(super) fn index_bytes(&self) -> usize {
        self.debug_infos().map(|d| d.index.bytes()).sum()
    }

    /// Compilation units with code indexed, over every module.
    pub(super) fn indexed_units(&self) -> usize {
        self.debug_infos().map(|d| d.spans.len()).sum()
    }

    /// The debug information of each module that has some, once opened.
    fn debug_infos(&self) -> impl Iterator<Item = &DebugInfo> {
        self.modules
            .iter()
            .filter_map(|m| m.debug.as_ref()?.as_ref())
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
        let mut new: Vec<u64> = addresses
            .iter()
            .copied()
            .filter(|a| !self.by_address.contains_key(a))
            .collect();
        new.sort_unstable();
        new.dedup();
        if !new.is_empty() {
            for (address, frames) in self.resolve(&new) {
                self.by_address.insert(address, frames.into());
            }
            // The names are kept; the debug information's pages are not
            // (clean file pages, read back on the next naming if needed).
            for debug in self.debug_infos() {
                forget_pages(debug.map);
            }
        }
        let mut frames = Vec::with_capacity(addresses.len() * 2);
        for address in addresses {
            if let Some(resolved) = self.by_address.get(&address) {
                frames.extend(resolved.iter().cloned());
            }
        }
        frames
    }

    #[cfg(test)]
    /// The frames of `raw` as addr2line names them with each module's whole
    /// DWARF, uncached: the reference the per-unit reading must agree with.
    pub(super) fn symbolize_with_addr2line(&mut self, raw: &RawStack) -> Vec<Frame> {
        let mut frames = Vec::new();
        for address in self.walker.walk(raw) {
            let Some(module) = self.modules.iter_mut().find(|m| m.loaded.contains(address)) else {
                continue;
            };
            let probe = address.wrapping_sub(module.loaded.bias);
            let system = module.loaded.system;
            let Some(debug) = module.debug_info() else {
                continue;
            };
            let context = addr2line::Context::from_dwarf(dwarf(&debug.object, debug.endian))
                .expect("addr2line context");
            let mut found: Vec<Frame> = addr2line_frames(&context, probe)
                .into_iter()
                .map(|f| to_frame(f, system))
                .collect();
            if found.is_empty() {
                found = debug
                    .symbol_frame(probe)
                    .into_iter()
                    .map(|f| to_frame(f, system))
                    .collect();
            }
            if found.is_empty() {
                found.push(Frame {
                    function: format!("{}+{probe:#x}", module.loaded.name),
                    file: None,
                    line: None,
                    user_code: false,
                });
            }
            frames.extend(found);
        }
        frames
    }

    /// Addresses with cached frames.
    pub(super) fn cached(&self) -> usize {
        self.by_address.len()
    }

    /// The frames at each of `addresses` (sorted, distinct, none cached).
    fn resolve(&mut self, addresses: &[u64]) -> Vec<(u64, Vec<Frame>)> {
        let mut resolved = Vec::with_capacity(addresses.len());
        let mut by_module: HashMap<usize, Vec<u64>> = HashMap::new();
        for &address in addresses {
            match self.modules.iter().position(|m| m.loaded.contains(address)) {
                Some(index) => by_module.entry(index).or_default().push(address),
                None => resolved.push((
                    address,
                    vec![Frame {
                        function: format!("{address:#x}"),
                        file: None,
                        line: None,
                        user_code: false,
                    }],
                )),
            }
        }
        for (index, addresses) in by_module {
            let module = &mut self.modules[index];
            let bias = module.loaded.bias;
            let system = module.loaded.system;
            let probes: Vec<u64> = addresses.iter().map(|a| a.wrapping_sub(bias)).collect();
            let named = match module.debug_info() {
                Some(debug) => {
                    let mut named = debug.frames(&probes);
                    for (frames, &probe) in named.iter_mut().zip(&probes) {
                        if frames.is_empty() {
                            // No DWARF for this address: the symbol table's name.
                            *frames = debug.symbol_frame(probe).into_iter().collect();
                        }
                    }
                    named
                        .into_iter()
                        .map(|frames| frames.into_iter().map(|f| to_frame(f, system)).collect())
                        .collect()
                }
                // The vDSO: no file, but its symbol table is in memory.
                None => probes
                    .iter()
                    .map(|&probe| image_symbol(&module.loaded, probe).into_iter().collect())
                    .collect::<Vec<Vec<Frame>>>(),
            };
            for ((address, probe), mut frames) in addresses.into_iter().zip(probes).zip(named) {
                if frames.is_empty() {
                    // Neither DWARF nor symbol: the module's file name and the
                    // offset, which `addr2line -e` or a debug-symbol package
                    // can resolve later.
                    frames.push(Frame {
                        function: format!("{}+{probe:#x}", module.loaded.name),
                        file: None,
                        line: None,
                        user_code: false,
                    });
                }
                resolved.push((address, frames));
            }
        }
        resolved
    }
}

#[cfg(test)]
/// Names one address inside every `every`-th function of the file at
/// `path`, by units and with addr2line's whole-module context; returns how
/// many were compared and a description of each disagreement.
pub(super) fn compare_with_addr2line(path: &Path, every: usize) -> (usize, Vec<String>) {
    use object::ObjectSymbol;
    let mut debug = DebugInfo::open(path).expect("debug information");
    let mut probes: Vec<u64> = debug
        .object
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 1)
        .step_by(every.max(1))
        .map(|s| s.address() + s.size() / 2)
        .collect();
    probes.sort_unstable();
    probes.dedup();
    let by_units = debug.frames_by_units(&probes);
    while debug.index_step() {}
    let indexed = debug.frames(&probes);
    let context = addr2line::Context::from_dwarf(dwarf(&debug.object, debug.endian))
        .expect("addr2line context");
    let mut differ = Vec::new();
    for ((probe, by_units), indexed) in probes.iter().zip(by_units).zip(indexed) {
        let theirs = addr2line_frames(&context, *probe);
        if by_units != theirs || indexed != theirs {
            differ.push(format!(
                "{probe:#x}: by units {by_units:?}\n  indexed {indexed:?}\n  addr2line {theirs:?}"
            ));
        }
    }
    (probes.len(), differ)
}

#[cfg(test)]
/// The frames addr2line gives at `probe`, those without a name left out
/// (as the symbolizer leaves them out).
fn addr2line_frames(context: &addr2line::Context<Slice<'_>>, probe: u64) -> Vec<DwarfFrame> {
    let mut frames = Vec::new();
    if let Ok(mut iter) = context.find_frames(probe).skip_all_loads() {
        while let Ok(Some(frame)) = iter.next() {
            let Some(function) = frame.function.as_ref().and_then(|f| f.demangle().ok()) else {
                continue;
            };
            let location = frame.location.as_ref();
            frames.push(DwarfFrame {
                function: function.into_owned(),
                file: location.and_then(|l| l.file).map(str::to_owned),
                line: location.and_then(|l| l.line),
            });
        }
    }
    frames
}

/// A frame as shown: the name without generic arguments, and whether it is
/// the application's own code.
fn to_frame(frame: DwarfFrame, system: bool) -> Frame {
    let user_code = !system && frame.file.as_deref().is_some_and(is_user_file);
    Frame {
        function: without_generic_arguments(frame.function),
        file: frame.file,
        line: frame.line,
        user_code,
    }
}

/// The name of the symbol at `probe` in a module that is only in memory.
fn image_symbol(module: &LoadedModule, probe: u64) -> Option<Frame> {
    let object = object::File::parse(module.image?).ok()?;
    let symbols = object.symbol_map();
    let symbol = symbols.containing(probe)?;
    Some(Frame {
        function: symbol.name().to_owned(),
        file: None,
        line: None,
        user_code: false,
    })
}

impl Module {
    fn debug_info(&mut self) -> Option<&mut DebugInfo> {
        let path = self.loaded.path.as_deref();
        self.debug
            .get_or_insert_with(|| path.and_then(DebugInfo::open))
            .as_mut()
    }
}

impl DebugInfo {
    /// Maps `path` for good and indexes its units through a second,
    /// passing mapping.
    fn open(path: &Path) -> Option<Self> {
        let map = mapped(path)?;
        let object = object::File::parse(&**map).ok()?;
        let endian = if object.is_little_endian() {
            gimli::RunTimeEndian::Little
        } else {
            gimli::RunTimeEndian::Big
        };
        let file = File::open(path).ok()?;
        // SAFETY: as in `mapped`. This second mapping lives while the
        // module is being indexed, and its pages are let go as it goes.
        let passing = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let (spans, offsets) = {
            let object = object::File::parse(&*passing).ok()?;
            index_units(&object, endian, &|| forget_pages(&passing))
        };
        let left = spans.iter().map(|s| s.offset).collect();
        Some(Self {
            map,
            object,
            endian,
            spans,
            offsets,
            symbols: None,
            index: Index::default(),
            indexing: Some(Indexing { passing, left }),
        })
    }

    /// Adds up to [`UNITS_PER_STEP`] units to the index; says whether any
    /// are left.
    fn index_step(&mut self) -> bool {
        let Some(indexing) = &mut self.indexing else {
            return false;
        };
        if let Ok(object) = object::File::parse(&*indexing.passing) {
            let dwarf = dwarf(&object, self.endian);
            let from = indexing.left.len().saturating_sub(UNITS_PER_STEP);
            for offset in indexing.left.drain(from..) {
                self.index.add_unit(&dwarf, offset);
            }
        } else {
            indexing.left.clear();
        }
        forget_pages(&indexing.passing);
        if indexing.left.is_empty() {
            self.index.finish();
            self.indexing = None;
            return false;
        }
        true
    }

    /// The frames at each of `probes` (file addresses, sorted), innermost
    /// first; empty where no unit has a function there. Each unit that may
    /// hold some of them is read once for all of those.
    fn frames(&self, probes: &[u64]) -> Vec<Vec<DwarfFrame>> {
        if self.indexing.is_none() {
            return self
                .index
                .frames(&dwarf(&self.object, self.endian), &self.offsets, probes);
        }
        self.frames_by_units(probes)
    }

    /// [`DebugInfo::frames`] without the index: each unit that may hold some
    /// of `probes` is read whole, once for all of those.
    fn frames_by_units(&self, probes: &[u64]) -> Vec<Vec<DwarfFrame>> {
        let mut found = vec![Vec::new(); probes.len()];
        // Units whose span holds each probe, the narrowest first: spans of
        // units whose code is interleaved overlap.
        let candidates: Vec<Vec<UnitSpan>> = probes
            .iter()
            .map(|&probe| {
                let below = self.spans.partition_point(|u| u.start <= probe);
                let mut units: Vec<UnitSpan> = self.spans[..below]
                    .iter()
                    .filter(|u| probe < u.end)
                    .copied()
                    .collect();
                units.sort_unstable_by_key(|u| u.end - u.start);
                units
            })
            .collect();
        let dwarf = dwarf(&self.object, self.endian);
        let mut reader = Frames::new(&dwarf, &self.offsets);
        for rank in 0.. {
            // The probes still unnamed, by their next candidate unit.
            let mut by_unit: HashMap<usize, Vec<usize>> = HashMap::new();
            for (index, units) in candidates.iter().enumerate() {
                if found[index].is_empty()
                    && let Some(unit) = units.get(rank)
                {
                    by_unit.entry(unit.offset).or_default().push(index);
                }
            }
            if by_unit.is_empty() {
                break;
            }
            for (offset, indices) in by_unit {
                let held: Vec<u64> = indices.iter().map(|&i| probes[i]).collect();
                let frames = reader.in_unit(offset, &held);
                for (index, frames) in indices.into_iter().zip(frames) {
                    found[index] = frames;
                }
            }
        }
        found
    }

    /// The symbol containing `probe`, as a frame.
    fn symbol_frame(&mut self, probe: u64) -> Option<DwarfFrame> {
        let object = &self.object;
        let symbols = self.symbols.get_or_insert_with(|| object.symbol_map());
        let name = symbols.containing(probe)?.name();
        Some(DwarfFrame {
            function: addr2line::demangle_auto(Cow::Borrowed(name), None).into_owned(),
            file: None,
            line: None,
        })
    }
}

/// The DWARF sections of `object`. A compressed section reads as empty:
/// its frames are then named from the symbol table.
fn dwarf<'a>(
    object: &object::File<'a, &'a [u8]>,
    endian: gimli::RunTimeEndian,
) -> gimli::Dwarf<Slice<'a>> {
    let section = |id: gimli::SectionId| -> Result<_, std::convert::Infallible> {
        let data = object
            .section_by_name(id.name())
            .filter(|s| {
                s.compressed_file_range()
                    .is_ok_and(|r| r.format == object::CompressionFormat::None)
            })
            .and_then(|s| s.data().ok())
            .unwrap_or(&[]);
        Ok(gimli::EndianSlice::new(data, endian))
    };
    gimli::Dwarf::load(section).unwrap_or_else(|never| match never {})
}

/// Each compilation unit with code, sorted by its lowest address, and every
/// unit's header offset, sorted.
///
/// Reading every unit's root and ranges touches most of the file's debug
/// sections; `forget_pages`, called every [`UNITS_PER_RELEASE`] units, lets
/// the pages read so far go, so the pass does not raise the process's peak
/// resident memory by the size of its debug information.
fn index_units<'a>(
    object: &object::File<'a, &'a [u8]>,
    endian: gimli::RunTimeEndian,
    forget_pages: &dyn Fn(),
) -> (Vec<UnitSpan>, Vec<usize>) {
    // No `populate_abbreviations_cache`: it reads every unit's header in a
    // pass of its own, before any page can be let go.
    let dwarf = dwarf(object, endian);
    let mut spans = Vec::new();
    let mut offsets = Vec::new();
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        offsets.push(header.offset().0);
        if offsets.len().is_multiple_of(UNITS_PER_RELEASE) {
            forget_pages();
        }
        let offset = header.offset().0;
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let (mut start, mut end) = (u64::MAX, 0);
        if let Ok(mut ranges) = dwarf.unit_ranges(&unit) {
            while let Ok(Some(range)) = ranges.next() {
                if range.begin < range.end {
                    start = start.min(range.begin);
                    end = end.max(range.end);
                }
            }
        }
        if start < end {
            spans.push(UnitSpan { start, end, offset });
        }
    }
    forget_pages();
    spans.sort_unstable_by_key(|u| u.start);
    (spans, offsets)
}

/// Lets the resident pages of a mapping go.
fn forget_pages(passing: &memmap2::Mmap) {
    // SAFETY: the mapping is private, read-only and never written, so after
    // MADV_DONTNEED its pages read back from the file exactly as before (see
    // `mapped` for the file itself). Slices into it stay valid: the range
    // stays mapped; only its resident pages are let go.
    let _ = unsafe { passing.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
}

/// `path` mapped into memory for the rest of the process, once per path.
/// Frames are named from it whenever a stall needs it; after each naming
/// its pages are let go ([`forget_pages`]), so it holds no resident memory
/// between namings.
fn mapped(path: &Path) -> Option<&'static memmap2::Mmap> {
    static MAPPED: Mutex<Vec<(PathBuf, &'static memmap2::Mmap)>> = Mutex::new(Vec::new());
    let mut maps = MAPPED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, map)) = maps.iter().find(|(p, _)| p == path) {
        return Some(map);
    }
    let file = File::open(path).ok()?;
    // SAFETY: the mapping is read-only and private. A loaded module's file
    // is not rewritten in place while it runs (the kernel refuses writes to
    // a running executable, ETXTBSY, and installers replace libraries by
    // renaming); were it truncated anyway, reads past its end would fault,
    // as for any tool reading debug information from a mapping (addr2line's
    // own loader maps files the same way).
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let map: &'static memmap2::Mmap = Box::leak(Box::new(map));
    maps.push((path.to_owned(), map));
    Some(map)
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
    let bytes = name.as_bytes();
    for (at, c) in name.char_indices().rev() {
        match c {
            // The `>` of a function type's `->` closes nothing.
            '>' if at > 0 && bytes[at - 1] == b'-' => {}
            '>' => depth += 1,
            '<' => {
                depth = depth.saturating_sub(1);
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

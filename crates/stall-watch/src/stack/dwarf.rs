//! The frames at a few addresses of one compilation unit, read from the
//! DWARF of that unit alone.
//!
//! addr2line answers the same question, but only from a context of the
//! whole module: it reads every unit's root and address ranges first (tens
//! of milliseconds and tens of MB for a large release binary). Here one
//! pass over the unit's entries finds the function holding each address,
//! a second reads its inlined calls, and one pass over its line program
//! finds each address's line; nothing is kept but the frames. A name found
//! through a reference into another unit (`DW_FORM_ref_addr`, which Rust's
//! release builds emit for code inlined across codegen units) is read from
//! that unit's entry.
//!
//! The rules are addr2line's (0.27), so the frames are the ones it would
//! give: a function is the `DW_TAG_subprogram` whose ranges hold the
//! address; its inlined calls nest by depth; a name is the linkage name,
//! else the name, else the abstract origin's or specification's; the
//! innermost frame's line comes from the line table, each caller's from the
//! inlined call's `DW_AT_call_file` and `DW_AT_call_line`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use addr2line::gimli::{self, Endianity as _, Reader as _, Section as _};

/// DWARF read from a mapped file.
pub(super) type Slice<'a> = gimli::EndianSlice<'a, gimli::RunTimeEndian>;

/// How deep a name is looked for through abstract origins (as addr2line).
const NAME_DEPTH: usize = 16;

/// A frame as the DWARF gives it: a demangled name, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DwarfFrame {
    pub(super) function: String,
    pub(super) file: Option<String>,
    pub(super) line: Option<u32>,
}

/// An inlined call holding a probe: its name and where it was called from.
#[derive(Debug, Clone)]
struct Inlined<'a> {
    /// Its name, once resolved from `naming`.
    name: Option<Slice<'a>>,
    naming: Naming<'a>,
    call_file: Option<u64>,
    call_line: u32,
}

/// The attributes that name an entry, kept as read so that only the
/// entries on a stack have their abstract origins followed (often into
/// other units): a function's body has thousands of inlined calls.
#[derive(Debug, Clone, Default)]
struct Naming<'a> {
    linkage: Option<Slice<'a>>,
    name: Option<Slice<'a>>,
    origin: Option<gimli::AttributeValue<Slice<'a>>>,
    /// The origin came before any `DW_AT_name`.
    origin_first: bool,
}

impl<'a> Naming<'a> {
    /// Reads one attribute if it names; says whether it did.
    fn read(
        &mut self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        attr: &gimli::Attribute<Slice<'a>>,
    ) -> bool {
        match attr.name() {
            gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                if let Ok(value) = unit.attr_string(attr.value()) {
                    self.linkage = Some(value);
                }
            }
            gimli::DW_AT_name => {
                if self.name.is_none() {
                    self.name = unit.attr_string(attr.value()).ok();
                }
            }
            gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => {
                if self.origin.is_none() {
                    self.origin_first = self.name.is_none();
                    self.origin = Some(attr.value());
                }
            }
            _ => return false,
        }
        true
    }

    /// The name addr2line gives: the linkage name; else whichever of the
    /// name and the origin's name came first and exists.
    fn resolve(
        &self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        others: &mut OtherUnits<'_, 'a>,
    ) -> Option<Slice<'a>> {
        if self.linkage.is_some() {
            return self.linkage;
        }
        let origin = |others: &mut OtherUnits<'_, 'a>| {
            self.origin
                .and_then(|value| others.name(unit, value, NAME_DEPTH))
        };
        if self.origin_first {
            origin(others).or(self.name)
        } else {
            self.name.or_else(|| origin(others))
        }
    }
}

/// A function's address attributes.
#[derive(Default)]
struct Ranges {
    low_pc: Option<u64>,
    high_pc: Option<u64>,
    size: Option<u64>,
    list: Option<gimli::RangeListsOffset>,
}

impl Ranges {
    /// Reads one attribute if it is about addresses; says whether it was.
    fn read<'a>(
        &mut self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        attr: &gimli::Attribute<Slice<'a>>,
    ) -> bool {
        match (attr.name(), attr.value()) {
            (gimli::DW_AT_low_pc, gimli::AttributeValue::Addr(a)) => self.low_pc = Some(a),
            (gimli::DW_AT_low_pc, gimli::AttributeValue::DebugAddrIndex(i)) => {
                self.low_pc = unit.address(i).ok();
            }
            (gimli::DW_AT_high_pc, gimli::AttributeValue::Addr(a)) => self.high_pc = Some(a),
            (gimli::DW_AT_high_pc, gimli::AttributeValue::DebugAddrIndex(i)) => {
                self.high_pc = unit.address(i).ok();
            }
            (gimli::DW_AT_high_pc, gimli::AttributeValue::Udata(n)) => self.size = Some(n),
            (gimli::DW_AT_ranges, value) => {
                self.list = unit.attr_ranges_offset(value).ok().flatten();
            }
            _ => return false,
        }
        true
    }

    /// Calls `each` with every non-empty range, `[begin, end)`.
    fn each(&self, unit: gimli::UnitRef<'_, Slice<'_>>, mut each: impl FnMut(u64, u64)) {
        let mut range = |begin: u64, end: u64| {
            if begin < end {
                each(begin, end);
            }
        };
        if let Some(list) = self.list {
            if let Ok(mut ranges) = unit.ranges(list) {
                while let Ok(Some(r)) = ranges.next() {
                    range(r.begin, r.end);
                }
            }
        } else if let (Some(low), Some(high)) = (self.low_pc, self.high_pc) {
            range(low, high);
        } else if let (Some(low), Some(size)) = (self.low_pc, self.size) {
            range(low, low.wrapping_add(size));
        }
    }

    /// Calls `hit` with the index of each probe (sorted) these ranges hold.
    fn each_probe(
        &self,
        unit: gimli::UnitRef<'_, Slice<'_>>,
        probes: &[u64],
        mut hit: impl FnMut(usize),
    ) {
        self.each(unit, |begin, end| {
            let from = probes.partition_point(|p| *p < begin);
            let to = probes.partition_point(|p| *p < end);
            (from..to).for_each(&mut hit);
        });
    }
}

/// The frames at each of `probes` (file addresses, sorted and distinct) in
/// the unit whose header is at `offset` in `.debug_info`, innermost first;
/// empty for a probe no function of the unit holds. `unit_offsets` lists
/// every unit's header offset, sorted, to follow references between units.
pub(super) fn frames_in_unit<'a>(
    dwarf: &gimli::Dwarf<Slice<'a>>,
    unit_offsets: &[usize],
    offset: usize,
    probes: &[u64],
) -> Vec<Vec<DwarfFrame>> {
    let Ok(header) = dwarf
        .debug_info
        .header_from_offset(gimli::DebugInfoOffset(offset))
    else {
        return vec![Vec::new(); probes.len()];
    };
    let Ok(unit) = dwarf.unit(header) else {
        return vec![Vec::new(); probes.len()];
    };
    let unit = gimli::UnitRef::new(dwarf, &unit);
    let mut others = OtherUnits::new(dwarf, unit_offsets);
    let functions = subprograms(unit, probes);
    let lines = lines(unit, probes);
    compose(unit, &mut others, probes, &functions, &lines)
}

/// The frames at each probe from the function holding it and the line
/// table's row at it: innermost first, each inlined call, then the
/// function; a caller's place is the call site of the callee below it.
fn compose<'a>(
    unit: gimli::UnitRef<'_, Slice<'a>>,
    others: &mut OtherUnits<'_, 'a>,
    probes: &[u64],
    functions: &[Option<gimli::UnitOffset>],
    lines: &[Option<(u64, u32)>],
) -> Vec<Vec<DwarfFrame>> {
    let mut out = vec![Vec::new(); probes.len()];
    let lang = language(unit);
    let mut files = FileNames::new(unit);
    let mut by_function: HashMap<gimli::UnitOffset, Vec<usize>> = HashMap::new();
    for (index, function) in functions.iter().enumerate() {
        if let Some(at) = function {
            by_function.entry(*at).or_default().push(index);
        }
    }
    for (at, indices) in by_function {
        let held: Vec<u64> = indices.iter().map(|&i| probes[i]).collect();
        let Some((name, chains)) = function_and_inlined(unit, others, at, &held) else {
            continue;
        };
        for (chain, &index) in chains.into_iter().zip(&indices) {
            let mut frames = Vec::with_capacity(chain.len() + 1);
            let mut place = lines[index].map(|(file, line)| (files.name(file), line));
            for call in chain.iter().rev() {
                push(&mut frames, call.name, lang, place.take());
                place = Some((call.call_file.and_then(|f| files.name(f)), call.call_line));
            }
            push(&mut frames, name, lang, place);
            out[index] = frames;
        }
    }
    out
}

/// Adds a frame, unless it has no name (addr2line's caller skips those).
fn push(
    frames: &mut Vec<DwarfFrame>,
    name: Option<Slice<'_>>,
    lang: Option<gimli::DwLang>,
    place: Option<(Option<String>, u32)>,
) {
    let Some(name) = name else {
        return;
    };
    let raw = String::from_utf8_lossy(name.slice());
    let function = addr2line::demangle_auto(Cow::Borrowed(raw.as_ref()), lang).into_owned();
    let (file, line) = place.unwrap_or((None, 0));
    frames.push(DwarfFrame {
        function,
        file,
        line: (line != 0).then_some(line),
    });
}

/// For each probe, the `DW_TAG_subprogram` (at any depth) whose ranges hold
/// it.
fn subprograms(
    unit: gimli::UnitRef<'_, Slice<'_>>,
    probes: &[u64],
) -> Vec<Option<gimli::UnitOffset>> {
    let mut found = vec![None; probes.len()];
    let mut left = probes.len();
    each_subprogram(unit, |at, ranges| {
        ranges.each_probe(unit, probes, |i| {
            if found[i].is_none() {
                found[i] = Some(at);
                left -= 1;
            }
        });
        left > 0
    });
    found
}

/// Calls `each` with every `DW_TAG_subprogram` of the unit (at any depth)
/// and its address attributes, in order, while it returns true.
fn each_subprogram<'a>(
    unit: gimli::UnitRef<'_, Slice<'a>>,
    mut each: impl FnMut(gimli::UnitOffset, &Ranges) -> bool,
) {
    let Ok(mut entries) = unit.entries_raw(None) else {
        return;
    };
    while !entries.is_empty() {
        let at = entries.next_offset();
        let Ok(abbrev) = entries.read_abbreviation() else {
            return;
        };
        let Some(abbrev) = abbrev else {
            continue;
        };
        if abbrev.tag() != gimli::DW_TAG_subprogram {
            if entries.skip_attributes(abbrev.attributes()).is_err() {
                return;
            }
            continue;
        }
        let mut ranges = Ranges::default();
        for spec in abbrev.attributes() {
            let Ok(attr) = entries.read_attribute(*spec) else {
                return;
            };
            ranges.read(unit, &attr);
        }
        if !each(at, &ranges) {
            return;
        }
    }
}

/// The name of the function at `at`, and for each of `probes` the chain of
/// inlined calls holding it, outermost first.
#[allow(clippy::type_complexity)]
fn function_and_inlined<'a>(
    unit: gimli::UnitRef<'_, Slice<'a>>,
    others: &mut OtherUnits<'_, 'a>,
    at: gimli::UnitOffset,
    probes: &[u64],
) -> Option<(Option<Slice<'a>>, Vec<Vec<Inlined<'a>>>)> {
    let mut entries = unit.entries_raw(Some(at)).ok()?;
    let depth = entries.next_depth();
    let abbrev = entries.read_abbreviation().ok()??;
    let mut naming = Naming::default();
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec).ok()?;
        naming.read(unit, &attr);
    }
    let name = naming.resolve(unit, others);
    let mut chains = vec![Vec::new(); probes.len()];
    inlined_children(unit, &mut entries, depth, 0, probes, &mut chains).ok()?;
    for call in chains.iter_mut().flatten() {
        call.name = call.naming.resolve(unit, others);
    }
    Some((name, chains))
}

/// Reads the children of the entry at `depth`: each inlined call holding a
/// probe extends that probe's chain if the chain is `inlined_depth` long.
fn inlined_children<'a>(
    unit: gimli::UnitRef<'_, Slice<'a>>,
    entries: &mut gimli::EntriesRaw<'_, Slice<'a>>,
    depth: isize,
    inlined_depth: usize,
    probes: &[u64],
    chains: &mut [Vec<Inlined<'a>>],
) -> gimli::Result<()> {
    loop {
        let next_depth = entries.next_depth();
        if next_depth <= depth {
            return Ok(());
        }
        let Some(abbrev) = entries.read_abbreviation()? else {
            continue;
        };
        match abbrev.tag() {
            gimli::DW_TAG_subprogram => {
                // A nested function is a function of its own.
                entries.skip_attributes(abbrev.attributes())?;
                while entries.next_depth() > next_depth {
                    if let Some(abbrev) = entries.read_abbreviation()? {
                        entries.skip_attributes(abbrev.attributes())?;
                    }
                }
            }
            gimli::DW_TAG_inlined_subroutine => {
                let mut ranges = Ranges::default();
                let mut call = Inlined {
                    name: None,
                    naming: Naming::default(),
                    call_file: None,
                    call_line: 0,
                };
                for spec in abbrev.attributes() {
                    let attr = entries.read_attribute(*spec)?;
                    if ranges.read(unit, &attr) || call.naming.read(unit, &attr) {
                        continue;
                    }
                    match attr.name() {
                        gimli::DW_AT_call_file => {
                            // DWARF 5 numbers files from 0; before, 0 is none.
                            if let gimli::AttributeValue::FileIndex(file) = attr.value()
                                && (file > 0 || unit.header.version() >= 5)
                            {
                                call.call_file = Some(file);
                            }
                        }
                        gimli::DW_AT_call_line => {
                            call.call_line = attr
                                .udata_value()
                                .and_then(|l| u32::try_from(l).ok())
                                .unwrap_or(0);
                        }
                        _ => {}
                    }
                }
                ranges.each_probe(unit, probes, |i| {
                    if chains[i].len() == inlined_depth {
                        chains[i].push(call.clone());
                    }
                });
                inlined_children(unit, entries, next_depth, inlined_depth + 1, probes, chains)?;
            }
            _ => entries.skip_attributes(abbrev.attributes())?,
        }
    }
}

/// The unit's source language, for demangling.
fn language(unit: gimli::UnitRef<'_, Slice<'_>>) -> Option<gimli::DwLang> {
    let mut entries = unit.entries_raw(None).ok()?;
    let abbrev = entries.read_abbreviation().ok()??;
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec).ok()?;
        if let gimli::AttributeValue::Language(lang) = attr.value() {
            return Some(lang);
        }
    }
    None
}

/// For each probe, the line table's (file index, line) at it: the last row
/// at or before it in the sequence holding it (a later row at the same
/// address replaces an earlier one).
fn lines(unit: gimli::UnitRef<'_, Slice<'_>>, probes: &[u64]) -> Vec<Option<(u64, u32)>> {
    match unit.line_program.clone() {
        Some(program) => rows_at(program, probes),
        None => vec![None; probes.len()],
    }
}

/// [`lines`] over any line program, stopping once every probe has a row.
fn rows_at(
    program: gimli::IncompleteLineProgram<Slice<'_>>,
    probes: &[u64],
) -> Vec<Option<(u64, u32)>> {
    let mut found = vec![None; probes.len()];
    let mut rows = program.rows();
    // The previous row of the current sequence: (address, file, line).
    let mut previous: Option<(u64, u64, u32)> = None;
    let mut left = probes.len();
    while let Ok(Some((_, row))) = rows.next_row() {
        let address = row.address();
        if let Some((at, file, line)) = previous
            && address > at
        {
            let start = probes.partition_point(|p| *p < at);
            let end = probes.partition_point(|p| *p < address);
            for slot in &mut found[start..end] {
                if slot.is_none() {
                    *slot = Some((file, line));
                    left -= 1;
                }
            }
            if left == 0 {
                break;
            }
        }
        if row.end_sequence() {
            previous = None;
            continue;
        }
        let line = row
            .line()
            .map_or(0, |l| u32::try_from(l.get()).unwrap_or(0));
        previous = Some((address, row.file_index(), line));
    }
    found
}

/// File names of one unit's line table, rendered as addr2line does:
/// compilation directory, then the file's directory, then its name, each
/// replacing what came before if absolute.
struct FileNames<'u, 'a> {
    unit: gimli::UnitRef<'u, Slice<'a>>,
    names: HashMap<u64, Option<String>>,
}

impl<'u, 'a> FileNames<'u, 'a> {
    fn new(unit: gimli::UnitRef<'u, Slice<'a>>) -> Self {
        Self {
            unit,
            names: HashMap::new(),
        }
    }

    fn name(&mut self, index: u64) -> Option<String> {
        let unit = self.unit;
        self.names
            .entry(index)
            .or_insert_with(|| {
                let header = unit.line_program.as_ref()?.header();
                let Some(file) = header.file(index) else {
                    // DWARF 4 and before have no file 0: addr2line names it "".
                    return (index == 0).then(String::new);
                };
                let mut path = unit
                    .comp_dir
                    .map(|d| String::from_utf8_lossy(d.slice()).into_owned())
                    .unwrap_or_default();
                if file.directory_index() != 0
                    && let Some(directory) = file.directory(header)
                {
                    push_path(&mut path, &string(unit, directory)?);
                }
                push_path(&mut path, &string(unit, file.path_name())?);
                Some(path)
            })
            .clone()
    }
}

fn string<'a>(
    unit: gimli::UnitRef<'_, Slice<'a>>,
    value: gimli::AttributeValue<Slice<'a>>,
) -> Option<String> {
    let value = unit.attr_string(value).ok()?;
    Some(String::from_utf8_lossy(value.slice()).into_owned())
}

fn push_path(path: &mut String, part: &str) {
    if part.starts_with('/') {
        *path = part.to_owned();
    } else {
        if !path.is_empty() && !path.ends_with('/') {
            path.push('/');
        }
        path.push_str(part);
    }
}

/// Units reached through references, read on demand for one naming: only
/// their header and abbreviations (a whole parse, with the root entry and
/// the line-program header, cost about 60 µs a unit and a cold stack
/// reaches three dozen of them), unless a name needs the unit's string
/// offsets.
struct OtherUnits<'d, 'a> {
    dwarf: &'d gimli::Dwarf<Slice<'a>>,
    offsets: &'d [usize],
    light: HashMap<usize, Option<Rc<Light<'a>>>>,
    parsed: HashMap<usize, Option<Rc<gimli::Unit<Slice<'a>>>>>,
}

/// A unit's header and abbreviations.
type Light<'a> = (gimli::UnitHeader<Slice<'a>>, Arc<gimli::Abbreviations>);

/// A name that only a whole parse of its unit can read (`DW_FORM_strx`).
struct NeedsUnit;

impl<'d, 'a> OtherUnits<'d, 'a> {
    fn new(dwarf: &'d gimli::Dwarf<Slice<'a>>, offsets: &'d [usize]) -> Self {
        Self {
            dwarf,
            offsets,
            light: HashMap::new(),
            parsed: HashMap::new(),
        }
    }

    /// The name an abstract origin or specification points to.
    fn name(
        &mut self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        value: gimli::AttributeValue<Slice<'a>>,
        depth: usize,
    ) -> Option<Slice<'a>> {
        if depth == 0 {
            return None;
        }
        match value {
            gimli::AttributeValue::UnitRef(at) => self.name_at(unit, at, depth),
            gimli::AttributeValue::DebugInfoRef(gimli::DebugInfoOffset(target)) => {
                self.name_elsewhere(target, depth)
            }
            _ => None,
        }
    }

    /// The name at `target` in `.debug_info`, in whichever unit holds it.
    fn name_elsewhere(&mut self, target: usize, depth: usize) -> Option<Slice<'a>> {
        let start = *self.offsets.get(
            self.offsets
                .partition_point(|o| *o <= target)
                .checked_sub(1)?,
        )?;
        let dwarf = self.dwarf;
        let light = self
            .light
            .entry(start)
            .or_insert_with(|| {
                let header = dwarf
                    .debug_info
                    .header_from_offset(gimli::DebugInfoOffset(start))
                    .ok()?;
                let abbreviations = dwarf.abbreviations(&header).ok()?;
                Some(Rc::new((header, abbreviations)))
            })
            .clone()?;
        let at = gimli::DebugInfoOffset(target).to_unit_offset(&light.0)?;
        if let Ok(name) = self.name_light(&light, at, depth) {
            return name;
        }
        let other = self
            .parsed
            .entry(start)
            .or_insert_with(|| dwarf.unit(light.0).ok().map(Rc::new))
            .clone()?;
        self.name_at(gimli::UnitRef::new(dwarf, &other), at, depth)
    }

    /// [`OtherUnits::name_at`] from a unit's header and abbreviations.
    fn name_light(
        &mut self,
        light: &Rc<Light<'a>>,
        at: gimli::UnitOffset,
        depth: usize,
    ) -> Result<Option<Slice<'a>>, NeedsUnit> {
        let (header, abbreviations) = &**light;
        let Ok(mut entries) = header.entries_raw(abbreviations, Some(at)) else {
            return Ok(None);
        };
        let Ok(Some(abbrev)) = entries.read_abbreviation() else {
            return Ok(None);
        };
        let mut name = None;
        let mut next = None;
        for spec in abbrev.attributes() {
            let Ok(attr) = entries.read_attribute(*spec) else {
                return Ok(None);
            };
            match attr.name() {
                gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                    if let Some(value) = self.string(attr.value())? {
                        return Ok(Some(value));
                    }
                }
                gimli::DW_AT_name => {
                    if let Some(value) = self.string(attr.value())? {
                        name = Some(value);
                    }
                }
                gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => {
                    next = Some(attr.value());
                }
                _ => {}
            }
        }
        if name.is_some() {
            return Ok(name);
        }
        // As `name(…, depth - 1)`.
        if depth <= 1 {
            return Ok(None);
        }
        Ok(match next {
            Some(gimli::AttributeValue::UnitRef(at)) => self.name_light(light, at, depth - 1)?,
            Some(gimli::AttributeValue::DebugInfoRef(gimli::DebugInfoOffset(target))) => {
                self.name_elsewhere(target, depth - 1)
            }
            _ => None,
        })
    }

    /// A string attribute, as `Dwarf::attr_string` reads it (`None` for a
    /// value that is not a string), for the forms that need no unit.
    fn string(
        &self,
        value: gimli::AttributeValue<Slice<'a>>,
    ) -> Result<Option<Slice<'a>>, NeedsUnit> {
        Ok(match value {
            gimli::AttributeValue::String(string) => Some(string),
            gimli::AttributeValue::DebugStrRef(at) => self.dwarf.debug_str.get_str(at).ok(),
            gimli::AttributeValue::DebugLineStrRef(at) => {
                self.dwarf.debug_line_str.get_str(at).ok()
            }
            gimli::AttributeValue::DebugStrOffsetsIndex(_) => return Err(NeedsUnit),
            _ => None,
        })
    }

    /// addr2line's `name_entry`: the linkage name, else the name, else
    /// where the abstract origin or specification leads.
    fn name_at(
        &mut self,
        unit: gimli::UnitRef<'_, Slice<'a>>,
        at: gimli::UnitOffset,
        depth: usize,
    ) -> Option<Slice<'a>> {
        let mut entries = unit.entries_raw(Some(at)).ok()?;
        let abbrev = entries.read_abbreviation().ok()??;
        let mut name = None;
        let mut next = None;
        for spec in abbrev.attributes() {
            let attr = entries.read_attribute(*spec).ok()?;
            match attr.name() {
                gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                    if let Ok(value) = unit.attr_string(attr.value()) {
                        return Some(value);
                    }
                }
                gimli::DW_AT_name => {
                    if let Ok(value) = unit.attr_string(attr.value()) {
                        name = Some(value);
                    }
                }
                gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => {
                    next = Some(attr.value());
                }
                _ => {}
            }
        }
        if name.is_some() {
            return name;
        }
        self.name(unit, next?, depth - 1)
    }
}

/// Where a function's code is: one range of it, its unit and its entry.
#[derive(Debug, Clone, Copy)]
pub(super) struct FunctionAt {
    start: u64,
    end: u64,
    /// Offset of its unit's header in `.debug_info`.
    unit: u32,
    /// Offset of its `DW_TAG_subprogram` entry in that unit.
    entry: u32,
}

/// Where one sequence of a unit's line program is: the addresses it covers
/// and its instructions' bytes in `.debug_line`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SequenceAt {
    start: u64,
    end: u64,
    unit: u32,
    instructions: u32,
    length: u32,
}

/// Each function's and each line sequence's addresses, over a module: a
/// naming then reads, per address, one function's entries and one
/// sequence's instructions rather than whole units. About 24 and 32 bytes
/// an entry.
#[derive(Debug, Default)]
pub(super) struct Index {
    functions: Vec<FunctionAt>,
    sequences: Vec<SequenceAt>,
}

impl Index {
    /// Adds the functions and line sequences of the unit at `offset`.
    pub(super) fn add_unit(&mut self, dwarf: &gimli::Dwarf<Slice<'_>>, offset: usize) {
        let (Ok(unit_at), Ok(header)) = (
            u32::try_from(offset),
            dwarf
                .debug_info
                .header_from_offset(gimli::DebugInfoOffset(offset)),
        ) else {
            return;
        };
        let Ok(unit) = dwarf.unit(header) else {
            return;
        };
        let unit = gimli::UnitRef::new(dwarf, &unit);
        each_subprogram(unit, |at, ranges| {
            if let Ok(entry) = u32::try_from(at.0) {
                ranges.each(unit, |start, end| {
                    self.functions.push(FunctionAt {
                        start,
                        end,
                        unit: unit_at,
                        entry,
                    });
                });
            }
            true
        });
        if let Some(program) = &unit.line_program {
            let header = program.header();
            let section = dwarf.debug_line.reader().slice();
            let instructions = header.raw_program_buf().slice();
            let base = (instructions.as_ptr() as usize).wrapping_sub(section.as_ptr() as usize);
            for (start, end, bytes) in sequences(header, instructions) {
                let (Ok(at), Ok(length)) = (
                    u32::try_from(base + bytes.start),
                    u32::try_from(bytes.end - bytes.start),
                ) else {
                    continue;
                };
                self.sequences.push(SequenceAt {
                    start,
                    end,
                    unit: unit_at,
                    instructions: at,
                    length,
                });
            }
        }
    }

    /// Sorts the entries; call once every unit is added.
    pub(super) fn finish(&mut self) {
        self.functions.sort_unstable_by_key(|f| f.start);
        self.sequences.sort_unstable_by_key(|s| s.start);
        self.functions.shrink_to_fit();
        self.sequences.shrink_to_fit();
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.functions.capacity() * size_of::<FunctionAt>()
            + self.sequences.capacity() * size_of::<SequenceAt>()
    }

    /// The function whose range holds `probe`.
    fn function(&self, probe: u64) -> Option<FunctionAt> {
        let below = self.functions.partition_point(|f| f.start <= probe);
        // Ranges may share a start (identical code folded): look back a few.
        self.functions[..below]
            .iter()
            .rev()
            .take(8)
            .find(|f| probe < f.end)
            .copied()
    }

    /// The line sequence holding `probe`.
    fn sequence(&self, probe: u64) -> Option<SequenceAt> {
        let below = self.sequences.partition_point(|s| s.start <= probe);
        self.sequences[..below]
            .iter()
            .rev()
            .take(8)
            .find(|s| probe < s.end)
            .copied()
    }

    /// The frames at each of `probes` (file addresses, sorted and distinct),
    /// innermost first, as [`frames_in_unit`] gives them; empty for a probe
    /// no indexed function holds.
    pub(super) fn frames<'a>(
        &self,
        dwarf: &gimli::Dwarf<Slice<'a>>,
        unit_offsets: &[usize],
        probes: &[u64],
    ) -> Vec<Vec<DwarfFrame>> {
        let mut out = vec![Vec::new(); probes.len()];
        let mut by_unit: HashMap<u32, Vec<(usize, FunctionAt)>> = HashMap::new();
        for (index, &probe) in probes.iter().enumerate() {
            if let Some(function) = self.function(probe) {
                by_unit
                    .entry(function.unit)
                    .or_default()
                    .push((index, function));
            }
        }
        let mut others = OtherUnits::new(dwarf, unit_offsets);
        for (offset, held) in by_unit {
            let Ok(header) = dwarf
                .debug_info
                .header_from_offset(gimli::DebugInfoOffset(offset as usize))
            else {
                continue;
            };
            let Ok(unit) = dwarf.unit(header) else {
                continue;
            };
            let unit = gimli::UnitRef::new(dwarf, &unit);
            let probes: Vec<u64> = held.iter().map(|&(i, _)| probes[i]).collect();
            let functions: Vec<Option<gimli::UnitOffset>> = held
                .iter()
                .map(|(_, f)| Some(gimli::UnitOffset(f.entry as usize)))
                .collect();
            let mut lines: Vec<Option<(u64, u32)>> = probes
                .iter()
                .map(|&probe| {
                    let sequence = self.sequence(probe).filter(|s| s.unit == offset)?;
                    line_in_sequence(dwarf, unit, sequence, probe)
                })
                .collect();
            // A probe outside the indexed sequences: the unit's whole table.
            let missing: Vec<usize> = (0..probes.len()).filter(|&i| lines[i].is_none()).collect();
            if !missing.is_empty() {
                let wanted: Vec<u64> = missing.iter().map(|&i| probes[i]).collect();
                for (i, line) in missing.into_iter().zip(self::lines(unit, &wanted)) {
                    lines[i] = line;
                }
            }
            let frames = compose(unit, &mut others, &probes, &functions, &lines);
            for ((index, _), frames) in held.into_iter().zip(frames) {
                out[index] = frames;
            }
        }
        out
    }
}

/// The row at `probe` in one sequence, run as a line program of its own:
/// the unit's line program header, then only that sequence's instructions
/// (a sequence starts from the initial state, so it runs the same alone).
fn line_in_sequence(
    dwarf: &gimli::Dwarf<Slice<'_>>,
    unit: gimli::UnitRef<'_, Slice<'_>>,
    sequence: SequenceAt,
    probe: u64,
) -> Option<(u64, u32)> {
    let program = unit.line_program.as_ref()?;
    let header = program.header();
    let section = dwarf.debug_line.reader().slice();
    let start = header.offset().0;
    let instructions = header.raw_program_buf().slice();
    let header_end = (instructions.as_ptr() as usize).checked_sub(section.as_ptr() as usize)?;
    let at = sequence.instructions as usize;
    let mut bytes = Vec::with_capacity(header_end - start + sequence.length as usize);
    bytes.extend_from_slice(section.get(start..header_end)?);
    bytes.extend_from_slice(section.get(at..at + sequence.length as usize)?);
    // The unit length covers everything after the length field itself.
    let endian = dwarf.debug_line.reader().endian();
    match header.format() {
        gimli::Format::Dwarf32 => {
            let length = u32::try_from(bytes.len() - 4).ok()?;
            bytes[..4].copy_from_slice(&if endian.is_big_endian() {
                length.to_be_bytes()
            } else {
                length.to_le_bytes()
            });
        }
        gimli::Format::Dwarf64 => {
            let length = u64::try_from(bytes.len() - 12).ok()?;
            bytes[4..12].copy_from_slice(&if endian.is_big_endian() {
                length.to_be_bytes()
            } else {
                length.to_le_bytes()
            });
        }
    }
    let alone = gimli::DebugLine::new(&bytes, endian)
        .program(
            gimli::DebugLineOffset(0),
            header.address_size(),
            unit.comp_dir,
            unit.name,
        )
        .ok()?;
    rows_at(alone, &[probe]).into_iter().next().flatten()
}

/// The sequences of a line program: the addresses each covers and the byte
/// range of its instructions. Follows only what moves the address and ends
/// sequences, per DWARF 5 §6.2.5; a program for more than one operation
/// per instruction (VLIW) yields none.
fn sequences(
    header: &gimli::LineProgramHeader<Slice<'_>>,
    program: &[u8],
) -> Vec<(u64, u64, std::ops::Range<usize>)> {
    let mut found = Vec::new();
    let base = header.opcode_base();
    let lengths = header.standard_opcode_lengths().slice();
    let minimum = u64::from(header.minimum_instruction_length());
    let range = u64::from(header.line_range());
    let address_size = usize::from(header.address_size());
    let big_endian = header.raw_program_buf().endian().is_big_endian();
    if range == 0 || header.maximum_operations_per_instruction() != 1 || base == 0 {
        return found;
    }
    let special = |opcode: u8| u64::from(opcode - base) / range * minimum;
    let mut at = 0;
    let mut begin = 0;
    let mut address = 0u64;
    let mut first_row: Option<u64> = None;
    while at < program.len() {
        let opcode = program[at];
        at += 1;
        if opcode >= base {
            address = address.wrapping_add(special(opcode));
            first_row.get_or_insert(address);
            continue;
        }
        match opcode {
            0 => {
                let Some((length, read)) = uleb128(&program[at..]) else {
                    return found;
                };
                at += read;
                let Some(end) = usize::try_from(length).ok().and_then(|l| at.checked_add(l)) else {
                    return found;
                };
                if length == 0 || end > program.len() {
                    return found;
                }
                match program[at] {
                    // DW_LNE_end_sequence: a row, then the registers reset.
                    1 => {
                        let start = first_row.unwrap_or(address);
                        if start != 0 && start < address {
                            found.push((start, address, begin..end));
                        }
                        address = 0;
                        first_row = None;
                        begin = end;
                    }
                    // DW_LNE_set_address.
                    2 if end - at > address_size && address_size <= 8 => {
                        let mut raw = [0u8; 8];
                        let operand = &program[at + 1..at + 1 + address_size];
                        if big_endian {
                            raw[8 - address_size..].copy_from_slice(operand);
                            address = u64::from_be_bytes(raw);
                        } else {
                            raw[..address_size].copy_from_slice(operand);
                            address = u64::from_le_bytes(raw);
                        }
                    }
                    _ => {}
                }
                at = end;
            }
            // DW_LNS_copy: a row.
            1 => {
                first_row.get_or_insert(address);
            }
            // DW_LNS_advance_pc.
            2 => {
                let Some((advance, read)) = uleb128(&program[at..]) else {
                    return found;
                };
                at += read;
                address = address.wrapping_add(advance.wrapping_mul(minimum));
            }
            // DW_LNS_const_add_pc: the advance of special opcode 255.
            8 => address = address.wrapping_add(special(255)),
            // DW_LNS_fixed_advance_pc: a 2-byte operand, not LEB128.
            9 => {
                let Some(operand) = program.get(at..at + 2) else {
                    return found;
                };
                let operand = [operand[0], operand[1]];
                let advance = if big_endian {
                    u16::from_be_bytes(operand)
                } else {
                    u16::from_le_bytes(operand)
                };
                at += 2;
                address = address.wrapping_add(u64::from(advance));
            }
            // Any other standard opcode: skip its LEB128 operands.
            _ => {
                let operands = lengths.get(usize::from(opcode) - 1).copied().unwrap_or(0);
                for _ in 0..operands {
                    let Some((_, read)) = uleb128(&program[at..]) else {
                        return found;
                    };
                    at += read;
                }
            }
        }
    }
    found
}

/// An unsigned LEB128 (skipping a signed one reads the same bytes), and
/// how many bytes it took.
fn uleb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

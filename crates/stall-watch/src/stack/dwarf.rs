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

use addr2line::gimli;

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
    name: Option<Slice<'a>>,
    call_file: Option<u64>,
    call_line: u32,
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

    /// Calls `hit` with the index of each probe (sorted) these ranges hold.
    fn each_probe(
        &self,
        unit: gimli::UnitRef<'_, Slice<'_>>,
        probes: &[u64],
        mut hit: impl FnMut(usize),
    ) {
        let mut range = |begin: u64, end: u64| {
            if begin < end {
                let from = probes.partition_point(|p| *p < begin);
                let to = probes.partition_point(|p| *p < end);
                (from..to).for_each(&mut hit);
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
    let mut out = vec![Vec::new(); probes.len()];
    let Ok(header) = dwarf
        .debug_info
        .header_from_offset(gimli::DebugInfoOffset(offset))
    else {
        return out;
    };
    let Ok(unit) = dwarf.unit(header) else {
        return out;
    };
    let unit = gimli::UnitRef::new(dwarf, &unit);
    let mut others = OtherUnits {
        dwarf,
        offsets: unit_offsets,
        parsed: HashMap::new(),
    };

    // The function holding each probe.
    let functions = subprograms(unit, probes);
    let lang = language(unit);
    let mut files = FileNames::new(unit);
    let lines = lines(unit, probes);
    let mut by_function: HashMap<gimli::UnitOffset, Vec<usize>> = HashMap::new();
    for (index, function) in functions.iter().enumerate() {
        if let Some(at) = function {
            by_function.entry(*at).or_default().push(index);
        }
    }
    for (at, indices) in by_function {
        let held: Vec<u64> = indices.iter().map(|&i| probes[i]).collect();
        let Some((name, chains)) = function_and_inlined(unit, &mut others, at, &held) else {
            continue;
        };
        for (chain, &index) in chains.into_iter().zip(&indices) {
            // Innermost first: each inlined call, then the function; a
            // caller's place is the call site of the callee below it.
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
    let Ok(mut entries) = unit.entries_raw(None) else {
        return found;
    };
    while !entries.is_empty() {
        let at = entries.next_offset();
        let Ok(abbrev) = entries.read_abbreviation() else {
            break;
        };
        let Some(abbrev) = abbrev else {
            continue;
        };
        if abbrev.tag() != gimli::DW_TAG_subprogram {
            if entries.skip_attributes(abbrev.attributes()).is_err() {
                break;
            }
            continue;
        }
        let mut ranges = Ranges::default();
        for spec in abbrev.attributes() {
            match entries.read_attribute(*spec) {
                Ok(attr) => {
                    ranges.read(unit, &attr);
                }
                Err(_) => return found,
            }
        }
        ranges.each_probe(unit, probes, |i| {
            found[i].get_or_insert(at);
        });
    }
    found
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
    let mut name = None;
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec).ok()?;
        match attr.name() {
            gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                if let Ok(value) = unit.attr_string(attr.value()) {
                    name = Some(value);
                }
            }
            gimli::DW_AT_name if name.is_none() => {
                name = unit.attr_string(attr.value()).ok();
            }
            gimli::DW_AT_abstract_origin | gimli::DW_AT_specification if name.is_none() => {
                name = others.name(unit, attr.value(), NAME_DEPTH);
            }
            _ => {}
        }
    }
    let mut chains = vec![Vec::new(); probes.len()];
    inlined_children(unit, others, &mut entries, depth, 0, probes, &mut chains).ok()?;
    Some((name, chains))
}

/// Reads the children of the entry at `depth`: each inlined call holding a
/// probe extends that probe's chain if the chain is `inlined_depth` long.
fn inlined_children<'a>(
    unit: gimli::UnitRef<'_, Slice<'a>>,
    others: &mut OtherUnits<'_, 'a>,
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
                    call_file: None,
                    call_line: 0,
                };
                for spec in abbrev.attributes() {
                    let attr = entries.read_attribute(*spec)?;
                    if ranges.read(unit, &attr) {
                        continue;
                    }
                    match attr.name() {
                        gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                            if let Ok(value) = unit.attr_string(attr.value()) {
                                call.name = Some(value);
                            }
                        }
                        gimli::DW_AT_name if call.name.is_none() => {
                            call.name = unit.attr_string(attr.value()).ok();
                        }
                        gimli::DW_AT_abstract_origin | gimli::DW_AT_specification
                            if call.name.is_none() =>
                        {
                            call.name = others.name(unit, attr.value(), NAME_DEPTH);
                        }
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
                inlined_children(
                    unit,
                    others,
                    entries,
                    next_depth,
                    inlined_depth + 1,
                    probes,
                    chains,
                )?;
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
    let mut found = vec![None; probes.len()];
    let Some(program) = unit.line_program.clone() else {
        return found;
    };
    let mut rows = program.rows();
    // The previous row of the current sequence: (address, file, line).
    let mut previous: Option<(u64, u64, u32)> = None;
    let mut assign = |from: u64, to: u64, file: u64, line: u32| {
        let start = probes.partition_point(|p| *p < from);
        let end = probes.partition_point(|p| *p < to);
        for slot in &mut found[start..end] {
            slot.get_or_insert((file, line));
        }
    };
    while let Ok(Some((_, row))) = rows.next_row() {
        let address = row.address();
        if let Some((at, file, line)) = previous
            && address > at
        {
            assign(at, address, file, line);
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

/// Units reached through references, parsed on demand for one naming.
struct OtherUnits<'d, 'a> {
    dwarf: &'d gimli::Dwarf<Slice<'a>>,
    offsets: &'d [usize],
    parsed: HashMap<usize, Option<Rc<gimli::Unit<Slice<'a>>>>>,
}

impl<'a> OtherUnits<'_, 'a> {
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
                let start = *self.offsets.get(
                    self.offsets
                        .partition_point(|o| *o <= target)
                        .checked_sub(1)?,
                )?;
                let dwarf = self.dwarf;
                let other = self
                    .parsed
                    .entry(start)
                    .or_insert_with(|| {
                        let header = dwarf
                            .debug_info
                            .header_from_offset(gimli::DebugInfoOffset(start))
                            .ok()?;
                        dwarf.unit(header).ok().map(Rc::new)
                    })
                    .clone()?;
                let at = gimli::DebugInfoOffset(target).to_unit_offset(&other.header)?;
                self.name_at(gimli::UnitRef::new(dwarf, &other), at, depth)
            }
            _ => None,
        }
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

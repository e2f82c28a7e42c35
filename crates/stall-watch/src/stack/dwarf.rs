//! The frames at a few addresses of one compilation unit, read from the
//! DWARF of that unit alone.
//!
//! addr2line answers the same question, but only from a context of the
//! whole module: it reads every unit's root and address ranges first (tens
//! of milliseconds and tens of MB for a large release binary). Here a
//! naming reads, per unit, the entries of the functions holding its
//! addresses (found by walking the unit, or from [`super::index`]), their
//! inlined calls, and each address's row of the line table; nothing is
//! kept but the frames. Names are followed through abstract origins only
//! for the calls on the stack, and a reference into another unit
//! (`DW_FORM_ref_addr`, which Rust's release builds emit for code inlined
//! across codegen units) is read from that unit's header, abbreviations
//! and entry.
//!
//! The rules are addr2line's (0.27), so the frames are the ones it would
//! give: a function is the `DW_TAG_subprogram` whose ranges hold the
//! address; its inlined calls nest by depth; a name is the linkage name,
//! else the name, else the abstract origin's or specification's; the
//! innermost frame's line comes from the line table, each caller's from the
//! inlined call's `DW_AT_call_file` and `DW_AT_call_line`.

use std::borrow::Cow;
use std::collections::HashMap;

use addr2line::gimli;

pub(super) use super::names::Slice;
use super::names::{Naming, OtherUnits};

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

/// A function's address attributes.
#[derive(Default)]
pub(super) struct Ranges {
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
    pub(super) fn each(&self, unit: gimli::UnitRef<'_, Slice<'_>>, mut each: impl FnMut(u64, u64)) {
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

/// Reads frames unit by unit for one naming, keeping what it learnt of the
/// units that names lead into.
pub(super) struct Frames<'d, 'a> {
    dwarf: &'d gimli::Dwarf<Slice<'a>>,
    others: OtherUnits<'d, 'a>,
}

impl<'d, 'a> Frames<'d, 'a> {
    /// `unit_offsets` lists every unit's header offset, sorted, to follow
    /// references between units.
    pub(super) fn new(dwarf: &'d gimli::Dwarf<Slice<'a>>, unit_offsets: &'d [usize]) -> Self {
        Self {
            dwarf,
            others: OtherUnits::new(dwarf, unit_offsets),
        }
    }

    /// The frames at each of `probes` (file addresses, sorted and distinct)
    /// in the unit whose header is at `offset` in `.debug_info`, innermost
    /// first; empty for a probe no function of the unit holds. Walks the
    /// unit's entries for the functions and runs its whole line table.
    pub(super) fn in_unit(&mut self, offset: usize, probes: &[u64]) -> Vec<Vec<DwarfFrame>> {
        self.read(
            offset,
            probes,
            |unit| subprograms(unit, probes),
            |_, _| None,
        )
    }

    /// [`Frames::in_unit`] with the function entry holding each probe
    /// given by `functions`, and `line` giving a probe's (file, line) row
    /// when it can find it faster than the unit's line table, which is run
    /// for the probes it leaves.
    pub(super) fn read(
        &mut self,
        offset: usize,
        probes: &[u64],
        functions: impl FnOnce(gimli::UnitRef<'_, Slice<'a>>) -> Vec<Option<gimli::UnitOffset>>,
        mut line: impl FnMut(gimli::UnitRef<'_, Slice<'a>>, u64) -> Option<(u64, u32)>,
    ) -> Vec<Vec<DwarfFrame>> {
        let dwarf = self.dwarf;
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
        let functions = functions(unit);
        let mut rows: Vec<Option<(u64, u32)>> = probes.iter().map(|&p| line(unit, p)).collect();
        let missing: Vec<usize> = (0..probes.len()).filter(|&i| rows[i].is_none()).collect();
        if !missing.is_empty() {
            let wanted: Vec<u64> = missing.iter().map(|&i| probes[i]).collect();
            for (i, row) in missing.into_iter().zip(lines(unit, &wanted)) {
                rows[i] = row;
            }
        }
        compose(unit, &mut self.others, probes, &functions, &rows)
    }
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
pub(super) fn each_subprogram<'a>(
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
pub(super) fn rows_at(
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

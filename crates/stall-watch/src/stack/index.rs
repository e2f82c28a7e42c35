//! Each function's and each line sequence's addresses over a module, so a
//! naming reads one function's entries and one line sequence per address
//! instead of whole units (see ARCHITECTURE.md, "Naming reads only the
//! DWARF of the functions on the stack").
//!
//! A line sequence is read alone by copying its unit's line-program header
//! followed by only that sequence's instructions, and patching the unit
//! length: a sequence starts from the line program's initial state, so it
//! runs the same alone. Finding where each sequence's instructions are
//! takes a pass over the program that follows only what moves the address
//! and ends sequences ([`sequences`]).

use std::collections::HashMap;

use addr2line::gimli::{self, Endianity as _, Reader as _, Section as _};

use super::dwarf::{DwarfFrame, Frames, Slice, each_subprogram, rows_at};

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
        holding(&self.functions, probe, |f| (f.start, f.end))
    }

    /// The line sequence holding `probe`.
    fn sequence(&self, probe: u64) -> Option<SequenceAt> {
        holding(&self.sequences, probe, |s| (s.start, s.end))
    }

    /// The frames at each of `probes` (file addresses, sorted and distinct),
    /// innermost first, as [`Frames::in_unit`] gives them; empty for a
    /// probe no indexed function holds.
    pub(super) fn frames(
        &self,
        dwarf: &gimli::Dwarf<Slice<'_>>,
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
        let mut frames = Frames::new(dwarf, unit_offsets);
        for (offset, held) in by_unit {
            let probes: Vec<u64> = held.iter().map(|&(i, _)| probes[i]).collect();
            let named = frames.read(
                offset as usize,
                &probes,
                |_| {
                    held.iter()
                        .map(|(_, f)| Some(gimli::UnitOffset(f.entry as usize)))
                        .collect()
                },
                |unit, probe| {
                    let sequence = self.sequence(probe).filter(|s| s.unit == offset)?;
                    line_in_sequence(dwarf, unit, sequence, probe)
                },
            );
            for ((index, _), named) in held.iter().zip(named) {
                out[*index] = named;
            }
        }
        out
    }
}

/// The entry of `sorted` (by start) whose `[start, end)` holds `probe`.
/// Ranges may share a start (identical code folded): a few are looked at.
fn holding<T: Copy>(sorted: &[T], probe: u64, range: impl Fn(&T) -> (u64, u64)) -> Option<T> {
    let below = sorted.partition_point(|t| range(t).0 <= probe);
    sorted[..below]
        .iter()
        .rev()
        .take(8)
        .find(|t| probe < range(t).1)
        .copied()
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
    // The unit length covers everything after the length field itself:
    // 4 bytes in 32-bit DWARF; 0xffffffff then 8 bytes in 64-bit DWARF.
    let endian = dwarf.debug_line.reader().endian();
    let (at, width) = match header.format() {
        gimli::Format::Dwarf32 => (0, 4),
        gimli::Format::Dwarf64 => (4, 8),
    };
    let length = u64::try_from(bytes.len() - at - width).ok()?;
    if width == 4 && u32::try_from(length).is_err() {
        return None;
    }
    let field = &mut bytes[at..at + width];
    if endian.is_big_endian() {
        field.copy_from_slice(&length.to_be_bytes()[8 - width..]);
    } else {
        field.copy_from_slice(&length.to_le_bytes()[..width]);
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

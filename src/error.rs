//! Why a probe could not be set up: one typed error per cause, naming what the user typed (the
//! spec, the object, the symbol) and what to do about it, with the underlying error as its source.
//! `report` renders them, as text or JSON, in one place.

use crate::objects::ElfError;
use crate::sigsafe::sys::Errno;
use crate::spec::SpecError;
use crate::xol::XolError;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("no function matching `{pattern}` in {object}")]
    NoFunction { pattern: String, object: String },
    #[error("{addr:#x} is not in an executable segment of {object}")]
    NotExecutable { addr: u64, object: String },
    #[error("`{symbol}` is not in an executable segment of {object}")]
    SymbolNotExecutable { symbol: String, object: String },
    #[error("offset {offset:#x} is past the end of `{symbol}` ({size:#x} bytes)")]
    PastEnd { symbol: String, offset: u64, size: u64 },
    #[error("offset {offset:#x} is not an instruction boundary of `{symbol}`: {detail}")]
    NotBoundary { symbol: String, offset: u64, detail: String },
    #[error("{addr:#x} is not a known instruction boundary in {object}: {why}")]
    Unproven { addr: u64, object: String, why: String },
    #[error("{source}")]
    Instruction {
        symbol: String,
        #[source]
        source: XolError,
    },
    #[error("libuprobe does not probe itself")]
    SelfProbe,
    #[error("`{symbol}` is refused: {why}")]
    Refused { symbol: String, why: String },
    #[error("a return probe on `{symbol}` is refused: {why}")]
    ReturnRefused { symbol: String, why: String },
    #[error(
        "a return probe goes on a function's entry: {addr:#x} is {place}, not the entry of a \
         function (as bpftrace, libuprobe refuses uretprobes inside functions)"
    )]
    ReturnNotEntry { addr: u64, place: String },
    #[error(
        "return probes are refused: the CPU's shadow stack is enabled for this process, and a \
         hijacked return would fault"
    )]
    ShadowStack,
    #[error("cannot resolve IFUNC `{symbol}` in {object}")]
    Ifunc { symbol: String, object: String },
    #[error(
        "IFUNC `{symbol}` resolves to {addr:#x} in {what}, which is not a file: only files can \
         be probed"
    )]
    NotAFile { symbol: String, addr: u64, what: String },
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("{path} is mapped shared at {addr:#x}: a breakpoint would be written to the file")]
    Shared { path: String, addr: u64 },
    #[error("{path} is mapped execute-only at {addr:#x}")]
    ExecuteOnly { path: String, addr: u64 },
    #[error("there is already an int3 at {addr:#x} (the program's own breakpoint?)")]
    AlreadyInt3 { addr: u64 },
    #[error("file offset {offset:#x} is not mapped executable")]
    NotMapped { offset: u64 },
    #[error("cannot write code at {addr:#x}: {source}")]
    Patch {
        addr: u64,
        #[source]
        source: Errno,
    },
    #[error("too many probe sites: every one of the {max} per-thread counters is taken")]
    NoCounter { max: usize },
    #[error("cannot set up the runtime: {why}")]
    Runtime { why: String },
    #[error("cannot read /proc/self/maps: {source}")]
    Maps {
        #[source]
        source: Errno,
    },
}

impl ProbeError {
    /// A stable name for the cause, for JSON readers.
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeError::Spec(_) => "malformed_spec",
            ProbeError::NoFunction { .. } => "no_such_function",
            ProbeError::NotExecutable { .. } | ProbeError::SymbolNotExecutable { .. } => {
                "not_executable"
            }
            ProbeError::PastEnd { .. } => "past_end",
            ProbeError::NotBoundary { .. } | ProbeError::Unproven { .. } => {
                "not_an_instruction_boundary"
            }
            ProbeError::Instruction { .. } => "instruction",
            ProbeError::SelfProbe => "self",
            ProbeError::Refused { .. } => "refused",
            ProbeError::ReturnRefused { .. }
            | ProbeError::ReturnNotEntry { .. }
            | ProbeError::ShadowStack => "return_refused",
            ProbeError::Ifunc { .. } | ProbeError::NotAFile { .. } => "ifunc",
            ProbeError::Elf(_) => "object_file",
            ProbeError::Shared { .. } | ProbeError::ExecuteOnly { .. } => "mapping",
            ProbeError::AlreadyInt3 { .. } => "already_int3",
            ProbeError::NotMapped { .. } => "not_mapped",
            ProbeError::Patch { .. } => "patch",
            ProbeError::NoCounter { .. } => "no_counter",
            ProbeError::Runtime { .. } | ProbeError::Maps { .. } => "runtime",
        }
    }
}

//! Full evaluation of DWARF CFI rows that framehop does not apply exactly.
//!
//! framehop turns the common rows (CFA = rsp/rbp + offset, return address and rbp saved at
//! CFA-relative slots) into cached rules; for anything else its evaluator handles no memory
//! reads in expressions and, when a row fails, silently falls back to frame pointers. The
//! rows gcc emits for functions that realign the stack (AVX code: ggml's kernels, BLAS) are
//! exactly that case: `DW_CFA_def_cfa_expression: DW_OP_breg6 (rbp): -8; DW_OP_deref` and
//! `DW_CFA_expression: rbp DW_OP_breg6 (rbp): 0`. Those FDEs are evaluated here with gimli,
//! reading memory from the copied stack, and a row that cannot be applied is an error (counted
//! as `bad_cfi`), never a guess.

use framehop::x86_64::UnwindRegsX86_64;
use gimli::{CfaRule, RegisterRule, UnwindSection, X86_64};

use super::elf::{debug_frame_of, eh_frame_of, CfiSource, ElfUnwindData, Fde, Reader};

/// Why a row could not be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EvalError {
    /// A stack read outside the copied bytes.
    Read(u64),
    /// The row needs a register the sample does not have, an unsupported operation, or it
    /// would not advance the unwind.
    Unusable,
}

type Row = gimli::UnwindTableRow<usize>;

/// Holds gimli's (heap-allocated, reused) unwind context.
pub(crate) struct Evaluator {
    ctx: Box<gimli::UnwindContext<usize>>,
}

impl Evaluator {
    pub fn new() -> Self {
        Evaluator {
            ctx: Box::new(gimli::UnwindContext::new()),
        }
    }

    /// Whether every row of `fde` is one framehop applies exactly. An FDE that cannot be
    /// parsed is not simple (its rows then fail here, visibly).
    pub fn fde_is_simple(&mut self, data: &ElfUnwindData, fde: Fde) -> bool {
        let ctx = &mut *self.ctx;
        let r = match fde.source {
            CfiSource::EhFrame => data.eh_frame.as_ref().map(|sec| {
                let s = eh_frame_of(sec);
                all_rows_simple(&s, &sec.bases, ctx, fde.offset)
            }),
            CfiSource::DebugFrame => data.debug_frame.as_ref().map(|sec| {
                let s = debug_frame_of(sec);
                all_rows_simple(&s, &sec.bases, ctx, fde.offset)
            }),
        };
        r.unwrap_or(Ok(false)).unwrap_or(false)
    }

    /// Applies the row of `fde` for ELF virtual address `vaddr` to `regs`: the caller's
    /// registers and return address, `Ok(None)` at the end of the stack.
    pub fn step(
        &mut self,
        data: &ElfUnwindData,
        fde: Fde,
        vaddr: u64,
        is_first: bool,
        regs: &mut UnwindRegsX86_64,
        read: &mut dyn FnMut(u64) -> Result<u64, ()>,
    ) -> Result<Option<u64>, EvalError> {
        let ctx = &mut *self.ctx;
        match fde.source {
            CfiSource::EhFrame => {
                let sec = data.eh_frame.as_ref().ok_or(EvalError::Unusable)?;
                let s = eh_frame_of(sec);
                step_in(&s, &sec.bases, ctx, fde.offset, vaddr, is_first, regs, read)
            }
            CfiSource::DebugFrame => {
                let sec = data.debug_frame.as_ref().ok_or(EvalError::Unusable)?;
                let s = debug_frame_of(sec);
                step_in(&s, &sec.bases, ctx, fde.offset, vaddr, is_first, regs, read)
            }
        }
    }
}

fn parse_fde<'a, S: UnwindSection<Reader<'a>>>(
    section: &S,
    bases: &gimli::BaseAddresses,
    offset: u32,
) -> gimli::Result<gimli::FrameDescriptionEntry<Reader<'a>>> {
    section.fde_from_offset(bases, S::Offset::from(offset as usize), |sec, b, off| {
        sec.cie_from_offset(b, off)
    })
}

fn all_rows_simple<'a, S: UnwindSection<Reader<'a>>>(
    section: &S,
    bases: &gimli::BaseAddresses,
    ctx: &mut gimli::UnwindContext<usize>,
    offset: u32,
) -> gimli::Result<bool> {
    let fde = parse_fde(section, bases, offset)?;
    let mut table = fde.rows(section, bases, ctx)?;
    while let Some(row) = table.next_row()? {
        if !row_is_simple(row) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The rows framehop's rule translation covers.
fn row_is_simple(row: &Row) -> bool {
    let cfa = matches!(row.cfa(), CfaRule::RegisterAndOffset { register, .. }
        if *register == X86_64::RSP || *register == X86_64::RBP);
    let ra = matches!(
        row.register(X86_64::RA),
        None | Some(RegisterRule::Undefined) | Some(RegisterRule::Offset(_))
    );
    let bp = matches!(
        row.register(X86_64::RBP),
        None | Some(RegisterRule::Undefined)
            | Some(RegisterRule::SameValue)
            | Some(RegisterRule::Offset(_))
    );
    cfa && ra && bp
}

#[allow(clippy::too_many_arguments)]
fn step_in<'a, S: UnwindSection<Reader<'a>>>(
    section: &S,
    bases: &gimli::BaseAddresses,
    ctx: &mut gimli::UnwindContext<usize>,
    offset: u32,
    vaddr: u64,
    is_first: bool,
    regs: &mut UnwindRegsX86_64,
    read: &mut dyn FnMut(u64) -> Result<u64, ()>,
) -> Result<Option<u64>, EvalError> {
    let fde = parse_fde(section, bases, offset).map_err(|_| EvalError::Unusable)?;
    let encoding = fde.cie().encoding();
    let row = fde
        .unwind_info_for_address(section, bases, ctx, vaddr)
        .map_err(|_| EvalError::Unusable)?;
    apply_row(section, row, encoding, is_first, regs, read)
}

fn reg(regs: &UnwindRegsX86_64, r: gimli::Register) -> Result<u64, EvalError> {
    match r {
        X86_64::RSP => Ok(regs.sp()),
        X86_64::RBP => Ok(regs.bp()),
        X86_64::RA => Ok(regs.ip()),
        // A kernel sample carries only ip, sp and bp.
        _ => Err(EvalError::Unusable),
    }
}

fn read_u64(read: &mut dyn FnMut(u64) -> Result<u64, ()>, addr: u64) -> Result<u64, EvalError> {
    read(addr).map_err(|()| EvalError::Read(addr))
}

fn apply_row<'a, S: UnwindSection<Reader<'a>>>(
    section: &S,
    row: &Row,
    encoding: gimli::Encoding,
    is_first: bool,
    regs: &mut UnwindRegsX86_64,
    read: &mut dyn FnMut(u64) -> Result<u64, ()>,
) -> Result<Option<u64>, EvalError> {
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => reg(regs, *register)?
            .checked_add_signed(*offset)
            .ok_or(EvalError::Unusable)?,
        CfaRule::Expression(e) => {
            let e = e.get(section).map_err(|_| EvalError::Unusable)?;
            eval(e, encoding, None, regs, read)?
        }
    };
    let value_of = |rule: RegisterRule<usize>,
                    regs: &UnwindRegsX86_64,
                    read: &mut dyn FnMut(u64) -> Result<u64, ()>|
     -> Result<Option<u64>, EvalError> {
        Ok(Some(match rule {
            RegisterRule::Undefined => return Ok(None),
            RegisterRule::SameValue => return Err(EvalError::Unusable),
            RegisterRule::Offset(o) => {
                read_u64(read, cfa.checked_add_signed(o).ok_or(EvalError::Unusable)?)?
            }
            RegisterRule::ValOffset(o) => cfa.checked_add_signed(o).ok_or(EvalError::Unusable)?,
            RegisterRule::Register(r) => reg(regs, r)?,
            RegisterRule::Expression(e) => {
                let e = e.get(section).map_err(|_| EvalError::Unusable)?;
                let at = eval(e, encoding, Some(cfa), regs, read)?;
                read_u64(read, at)?
            }
            RegisterRule::ValExpression(e) => {
                let e = e.get(section).map_err(|_| EvalError::Unusable)?;
                eval(e, encoding, Some(cfa), regs, read)?
            }
            RegisterRule::Constant(c) => c,
            _ => return Err(EvalError::Unusable),
        }))
    };
    let ra = match row.register(X86_64::RA) {
        None => return Ok(None),
        Some(rule) => match value_of(rule, regs, read)? {
            // The return address is undefined: the unwind info says the stack ends here.
            None => return Ok(None),
            Some(ra) => ra,
        },
    };
    let bp = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::Undefined) | Some(RegisterRule::SameValue) => regs.bp(),
        Some(rule) => value_of(rule, regs, read)?.unwrap_or(regs.bp()),
    };
    if ra == 0 {
        return Ok(None);
    }
    if (!is_first && cfa < regs.sp()) || (cfa == regs.sp() && ra == regs.ip()) {
        return Err(EvalError::Unusable);
    }
    regs.set_ip(ra);
    regs.set_sp(cfa);
    regs.set_bp(bp);
    Ok(Some(ra))
}

/// Evaluates a DWARF expression to an address; `initial` is pushed first (register rules get
/// the CFA).
fn eval<'a>(
    expr: gimli::Expression<Reader<'a>>,
    encoding: gimli::Encoding,
    initial: Option<u64>,
    regs: &UnwindRegsX86_64,
    read: &mut dyn FnMut(u64) -> Result<u64, ()>,
) -> Result<u64, EvalError> {
    use gimli::EvaluationResult as E;
    let mut e = expr.evaluation(encoding);
    if let Some(v) = initial {
        e.set_initial_value(v);
    }
    let mut r = e.evaluate().map_err(|_| EvalError::Unusable)?;
    for _ in 0..64 {
        r = match r {
            E::Complete => {
                let pieces = e.as_result();
                return match pieces.last().map(|p| &p.location) {
                    Some(gimli::Location::Address { address }) => Ok(*address),
                    _ => Err(EvalError::Unusable),
                };
            }
            E::RequiresRegister { register, .. } => {
                let v = reg(regs, register)?;
                e.resume_with_register(gimli::Value::Generic(v))
            }
            E::RequiresMemory { address, size, .. } => {
                let mut v = read_u64(read, address)?;
                if size < 8 {
                    v &= (1u64 << (u32::from(size) * 8)) - 1;
                }
                e.resume_with_memory(gimli::Value::Generic(v))
            }
            _ => return Err(EvalError::Unusable),
        }
        .map_err(|_| EvalError::Unusable)?;
    }
    Err(EvalError::Unusable)
}

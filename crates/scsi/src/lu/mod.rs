//! The logical unit: a disk (peripheral device type 0) served over a [`BlockBackend`].
//!
//! [`LogicalUnit::execute`] takes one CDB plus its Data-Out bytes and returns status, sense and
//! Data-In. Per-I_T-nexus state (unit attentions, PREVENT ALLOW MEDIUM REMOVAL) and shared state
//! (reservations, mode pages) live behind one `RwLock` that commands hold only for bookkeeping,
//! never while data is copied. Data transfers are ordered against COMPARE AND WRITE, ORWRITE and
//! WRITE ATOMIC by 64 striped `RwLock`s: ordinary I/O takes its stripes shared, the atomic
//! commands take them exclusive.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::BlockBackend;
use crate::cdb::{self, op};
use crate::codes::{AscAscq, ScsiStatus, SenseKey};
use crate::sense::Sense;

pub(crate) mod info;
mod io;
mod mode;
mod pr;
pub(crate) mod table;

use mode::ModeParams;
use pr::PrState;
use table::{Class, CmdInfo, Needs};

/// Identity of an I_T nexus, used for reservations and unit attentions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ItNexus {
    /// Initiator port name, e.g. `iqn.x,i,0x00023d000001`.
    pub initiator_port: String,
    /// Target port name, e.g. `iqn.y,t,0x0001`.
    pub target_port: String,
    /// Relative target port identifier reported in VPD page 83h and READ FULL STATUS.
    pub relative_target_port: u16,
}

/// What a command produced. `data` is the Data-In (already truncated to the CDB's allocation
/// length); `sense` is the encoded sense data (empty unless CHECK CONDITION).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    pub status: ScsiStatus,
    pub sense: Vec<u8>,
    pub data: Vec<u8>,
}

impl ScsiResponse {
    /// GOOD status with Data-In.
    pub fn good(data: Vec<u8>) -> Self {
        ScsiResponse {
            status: ScsiStatus::GOOD,
            sense: Vec::new(),
            data,
        }
    }

    /// CHECK CONDITION with the given sense, encoded in descriptor format if `descriptor`.
    pub fn check(sense: &Sense, descriptor: bool) -> Self {
        ScsiResponse {
            status: ScsiStatus::CHECK_CONDITION,
            sense: sense.encode(descriptor),
            data: Vec::new(),
        }
    }

    /// RESERVATION CONFLICT (no sense data).
    pub fn reservation_conflict() -> Self {
        ScsiResponse {
            status: ScsiStatus::RESERVATION_CONFLICT,
            sense: Vec::new(),
            data: Vec::new(),
        }
    }

    /// Decodes `sense` (for tests and logs).
    pub fn parsed_sense(&self) -> Option<Sense> {
        Sense::parse(&self.sense)
    }
}

/// Configuration of one logical unit. Every field has a documented default.
#[derive(Clone, Debug)]
pub struct LuConfig {
    /// T10 vendor identification, up to 8 ASCII characters (default `VISCSI`).
    pub vendor: String,
    /// Product identification, up to 16 ASCII characters (default `VIRTUAL DISK`).
    pub product: String,
    /// Product revision level, up to 4 ASCII characters (default `0001`).
    pub revision: String,
    /// Unit serial number (VPD 80h); default `0`. Should be unique per LU.
    pub serial: String,
    /// Source of the NAA 6 designator in VPD 83h; must be unique per LU and stable across
    /// restarts and hosts (multipath and migration compare it). Default 1.
    pub naa_id: u64,
    /// IEEE company identifier (OUI, 24 bits) placed in the NAA designator. Default 0.
    pub ieee_company_id: u32,
    /// Logical block size: 512 or 4096 (default 512). Other values fall back to 512.
    pub block_size: u32,
    /// Advertise thin provisioning (LBPME, UNMAP, WRITE SAME with UNMAP); honoured only if the
    /// back-end can discard. Default true.
    pub thin_provisioning: bool,
    /// Initial WCE bit of the caching mode page. When clear every write is forced to the medium
    /// (FUA). Default true.
    pub write_cache: bool,
    /// Report removable medium (RMB), enabling START STOP UNIT eject/load and PREVENT ALLOW
    /// MEDIUM REMOVAL. Default false: a virtual disk is not removable.
    pub removable: bool,
    /// Largest transfer in bytes (Block Limits VPD). Also caps WRITE SAME and WRITE ATOMIC.
    /// Default 32 MiB.
    pub max_transfer_bytes: u32,
    /// SCSI protocol identifier of the transport (SPC-4 table 362), used in VPD 83h target-port
    /// designators and TransportIDs. Default 5 (iSCSI).
    pub protocol_id: u8,
}

impl Default for LuConfig {
    fn default() -> Self {
        LuConfig {
            vendor: "VISCSI".into(),
            product: "VIRTUAL DISK".into(),
            revision: "0001".into(),
            serial: "0".into(),
            naa_id: 1,
            ieee_company_id: 0,
            block_size: 512,
            thin_provisioning: true,
            write_cache: true,
            removable: false,
            max_transfer_bytes: 32 << 20,
            protocol_id: 5,
        }
    }
}

/// Why a command did not complete with GOOD.
#[derive(Debug)]
pub(crate) enum Fail {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

pub(crate) type CmdResult = Result<Vec<u8>, Fail>;

/// Most unit attentions we queue per nexus; older ones are dropped first.
const MAX_PENDING_UAS: usize = 8;
/// Lost nexuses we remember (so a nexus that comes back is not "new"); beyond this the oldest
/// are forgotten.
const MAX_LOST_NEXUSES: usize = 256;

#[derive(Default)]
struct NexusState {
    ua: VecDeque<AscAscq>,
    /// PREVENT ALLOW MEDIUM REMOVAL state of this nexus.
    prevent: bool,
    lost: bool,
}

struct LuState {
    nexuses: HashMap<ItNexus, NexusState>,
    lost_order: VecDeque<ItNexus>,
    /// Holder of the SPC-2 RESERVE(6)/(10) reservation.
    reserve6: Option<ItNexus>,
    pr: PrState,
    mode_current: ModeParams,
    mode_saved: ModeParams,
    medium_present: bool,
}

impl LuState {
    fn queue_ua(&mut self, nexus: &ItNexus, code: AscAscq) {
        if let Some(ns) = self.nexuses.get_mut(nexus) {
            push_ua(ns, code);
        }
    }

    fn queue_ua_all_except(&mut self, except: Option<&ItNexus>, code: AscAscq) {
        for (n, ns) in self.nexuses.iter_mut() {
            if Some(n) != except {
                push_ua(ns, code);
            }
        }
    }
}

fn push_ua(ns: &mut NexusState, code: AscAscq) {
    if ns.ua.contains(&code) {
        return;
    }
    if ns.ua.len() >= MAX_PENDING_UAS {
        ns.ua.pop_front();
    }
    ns.ua.push_back(code);
}

const STRIPES: usize = 64;
const STRIPE_SHIFT: u32 = 17; // 128 KiB per stripe granule

/// One logical unit (a disk).
pub struct LogicalUnit {
    backend: Arc<dyn BlockBackend>,
    config: LuConfig,
    block_shift: u32,
    thin: bool,
    read_only: bool,
    state: RwLock<LuState>,
    // Mirrors of mode parameters read on every command.
    d_sense: AtomicBool,
    wce: AtomicBool,
    swp: AtomicBool,
    medium_present: AtomicBool,
    /// True while a RESERVE(6) or persistent reservation exists; lets I/O skip the conflict
    /// check (and its lock) in the common case.
    reserved: AtomicBool,
    stripes: Box<[RwLock<()>]>,
}

impl LogicalUnit {
    /// A logical unit over `backend`. Thin provisioning is advertised only if both the config
    /// asks for it and the back-end can discard.
    pub fn new(backend: Arc<dyn BlockBackend>, mut config: LuConfig) -> Self {
        if config.block_size != 512 && config.block_size != 4096 {
            tracing::warn!(
                block_size = config.block_size,
                "unsupported block size, using 512"
            );
            config.block_size = 512;
        }
        let block_shift = config.block_size.trailing_zeros();
        let read_only = backend.read_only();
        let thin = config.thin_provisioning && !read_only && backend.as_discard().is_some();
        let mode = ModeParams {
            wce: config.write_cache,
            d_sense: false,
            swp: false,
        };
        LogicalUnit {
            d_sense: AtomicBool::new(false),
            wce: AtomicBool::new(mode.wce),
            swp: AtomicBool::new(false),
            medium_present: AtomicBool::new(true),
            reserved: AtomicBool::new(false),
            state: RwLock::new(LuState {
                nexuses: HashMap::new(),
                lost_order: VecDeque::new(),
                reserve6: None,
                pr: PrState::default(),
                mode_current: mode,
                mode_saved: mode,
                medium_present: true,
            }),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            backend,
            config,
            block_shift,
            thin,
            read_only,
        }
    }

    /// The configuration this unit was built with (block size normalised).
    pub fn config(&self) -> &LuConfig {
        &self.config
    }

    /// The back-end serving this unit.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }

    /// Capacity in logical blocks.
    pub fn num_blocks(&self) -> u64 {
        self.backend.len() >> self.block_shift
    }

    /// True if the unit advertises thin provisioning (LBPME).
    pub fn thin_provisioned(&self) -> bool {
        self.thin
    }

    fn descriptor_sense(&self) -> bool {
        self.d_sense.load(Ordering::Relaxed)
    }

    fn lock_read(&self) -> RwLockReadGuard<'_, LuState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_write(&self) -> RwLockWriteGuard<'_, LuState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Executes one command. `data_out` holds all Data-Out bytes the initiator sent (possibly
    /// fewer or more than the CDB implies).
    pub fn execute(&self, nexus: &ItNexus, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        let result = self.dispatch(nexus, cdb, data_out);
        match result {
            Ok(data) => ScsiResponse::good(data),
            Err(Fail::Check(sense)) => {
                tracing::debug!(cmd = %cdb::describe(cdb), key = ?sense.key, asc = ?sense.asc, "check condition");
                ScsiResponse::check(&sense, self.descriptor_sense())
            }
            Err(Fail::Conflict) => ScsiResponse::reservation_conflict(),
        }
    }

    fn dispatch(&self, nexus: &ItNexus, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let Some(&opcode) = cdb.first() else {
            return Err(Sense::invalid_opcode().into());
        };
        let sa = cdb::byte(cdb, 1) & 0x1f;
        let info = table::lookup(opcode, sa).filter(|i| self.available(i));
        // Unit attentions come before everything else, except for the exempt commands.
        let exempt = info.is_some_and(|i| i.class == Class::Exempt);
        self.check_unit_attention(nexus, exempt)?;
        let Some(info) = info else {
            if table::has_service_actions(opcode) {
                return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
            }
            return Err(Sense::invalid_opcode().into());
        };
        if cdb.len() < info.usage.len() {
            return Err(Sense::invalid_field_in_cdb(cdb.len() as u16, None).into());
        }
        let control = cdb[info.usage.len() - 1];
        if control & 0x04 != 0 {
            // NACA: we do not support ACA (NormACA is clear in INQUIRY).
            return Err(Sense::invalid_field_in_cdb(info.usage.len() as u16 - 1, Some(2)).into());
        }
        self.check_conflict(nexus, info, cdb)?;
        if info.medium && !self.medium_present.load(Ordering::Relaxed) {
            return Err(Sense::new(SenseKey::NOT_READY, AscAscq::MEDIUM_NOT_PRESENT).into());
        }
        self.run(nexus, opcode, cdb, data_out)
    }

    fn available(&self, info: &CmdInfo) -> bool {
        match info.needs {
            Needs::Nothing => true,
            Needs::Thin => self.thin,
        }
    }

    fn run(&self, nexus: &ItNexus, opcode: u8, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        match opcode {
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cdb),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => self.write(cdb, data_out),
            op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
                self.write(cdb, data_out)
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cdb, data_out),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(cdb, data_out),
            op::UNMAP => self.unmap(cdb, data_out),
            op::COMPARE_AND_WRITE => self.compare_and_write(cdb, data_out),
            op::ORWRITE_16 => self.orwrite(cdb, data_out),
            op::WRITE_ATOMIC_16 => self.write_atomic(cdb, data_out),
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => self.prefetch(cdb),
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => self.synchronize_cache(cdb),
            op::TEST_UNIT_READY => Ok(Vec::new()),
            op::INQUIRY => self.inquiry(nexus, cdb),
            op::REQUEST_SENSE => self.request_sense(nexus, cdb),
            op::REPORT_LUNS => info::report_luns(cdb, std::iter::once(0)),
            op::READ_CAPACITY_10 => self.read_capacity_10(cdb),
            op::SERVICE_ACTION_IN_16 => match cdb::byte(cdb, 1) & 0x1f {
                cdb::sa::READ_CAPACITY_16 => self.read_capacity_16(cdb),
                _ => self.get_lba_status(cdb),
            },
            op::MAINTENANCE_IN => match cdb::byte(cdb, 1) & 0x1f {
                cdb::sa::REPORT_SUPPORTED_OPERATION_CODES => self.report_supported_opcodes(cdb),
                _ => info::report_supported_tmfs(cdb),
            },
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => self.mode_select(nexus, cdb, data_out),
            op::START_STOP_UNIT => self.start_stop_unit(cdb),
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => self.prevent_allow(nexus, cdb),
            op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => info::read_defect_data(cdb),
            op::RESERVE_6 | op::RESERVE_10 => self.refreshing(|| self.reserve_6(nexus, cdb)),
            op::RELEASE_6 | op::RELEASE_10 => self.refreshing(|| self.release_6(nexus, cdb)),
            op::PERSISTENT_RESERVE_IN => self.persistent_reserve_in(nexus, cdb),
            op::PERSISTENT_RESERVE_OUT => {
                self.refreshing(|| self.persistent_reserve_out(nexus, cdb, data_out))
            }
            _ => Err(Sense::invalid_opcode().into()),
        }
    }

    /// Registers a new nexus (with POWER ON UA) and reports the oldest pending UA unless the
    /// command is exempt. The fast path only takes the state lock shared.
    fn check_unit_attention(&self, nexus: &ItNexus, exempt: bool) -> Result<(), Fail> {
        {
            let st = self.lock_read();
            match st.nexuses.get(nexus) {
                Some(ns) if !ns.lost && (exempt || ns.ua.is_empty()) => return Ok(()),
                _ => {}
            }
        }
        let mut st = self.lock_write();
        let ns = self.touch_nexus(&mut st, nexus);
        if exempt {
            return Ok(());
        }
        match ns.ua.pop_front() {
            Some(code) => Err(Sense::new(SenseKey::UNIT_ATTENTION, code).into()),
            None => Ok(()),
        }
    }

    /// The nexus's state, created with a POWER ON UA if it is new; a lost nexus that returns is
    /// known again without a new UA.
    fn touch_nexus<'a>(&self, st: &'a mut LuState, nexus: &ItNexus) -> &'a mut NexusState {
        if st.nexuses.get(nexus).is_some_and(|n| n.lost) {
            st.lost_order.retain(|n| n != nexus);
        }
        let ns = st.nexuses.entry(nexus.clone()).or_insert_with(|| {
            let mut ns = NexusState::default();
            ns.ua
                .push_back(AscAscq::POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED);
            ns
        });
        ns.lost = false;
        ns
    }

    /// Runs a command that may change reservations, then refreshes the `reserved` flag.
    fn refreshing(&self, f: impl FnOnce() -> CmdResult) -> CmdResult {
        let r = f();
        let st = self.lock_read();
        self.note_reservations(&st);
        r
    }

    fn note_reservations(&self, st: &LuState) {
        let any = st.reserve6.is_some() || st.pr.reservation.is_some();
        self.reserved.store(any, Ordering::Release);
    }

    fn check_conflict(&self, nexus: &ItNexus, info: &CmdInfo, cdb: &[u8]) -> Result<(), Fail> {
        if matches!(info.class, Class::Exempt | Class::PrOut)
            || !self.reserved.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let st = self.lock_read();
        if let Some(holder) = &st.reserve6 {
            if holder != nexus {
                let allowed = match info.class {
                    Class::Info | Class::Release => true,
                    _ => {
                        info.opcode == op::PREVENT_ALLOW_MEDIUM_REMOVAL
                            && cdb::byte(cdb, 4) & 3 == 0
                    }
                };
                if !allowed {
                    return Err(Fail::Conflict);
                }
            }
        }
        if st.pr.reservation.is_some() {
            match info.class {
                Class::Reserve | Class::Release => return Err(Fail::Conflict),
                Class::Read | Class::Write
                    if st.pr.conflicts(nexus, info.class == Class::Write) =>
                {
                    return Err(Fail::Conflict);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Data-Out bytes the CDB asks for; `None` if the command has no Data-Out phase. Block-size
    /// aware; never panics.
    pub fn expected_data_out_len(&self, cdb: &[u8]) -> Option<usize> {
        let bs = u64::from(self.config.block_size);
        let opcode = *cdb.first()?;
        let blocks = |n: u64| usize::try_from(n.saturating_mul(bs)).unwrap_or(usize::MAX);
        Some(match opcode {
            op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::ORWRITE_16
            | op::WRITE_ATOMIC_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16 => blocks(u64::from(cdb::lba_and_length(cdb)?.1)),
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => match (cdb::byte(cdb, 1) >> 1) & 3 {
                0 => return None,
                1 => blocks(u64::from(cdb::lba_and_length(cdb)?.1)),
                3 => blocks(1),
                _ => 0,
            },
            op::COMPARE_AND_WRITE => blocks(2 * u64::from(cdb::byte(cdb, 13))),
            op::WRITE_SAME_10 => blocks(1),
            op::WRITE_SAME_16 => {
                if cdb::byte(cdb, 1) & 0x01 != 0 {
                    0
                } else {
                    blocks(1)
                }
            }
            op::UNMAP | op::MODE_SELECT_10 => usize::from(cdb::be16(cdb, 7)),
            op::MODE_SELECT_6 => usize::from(cdb::byte(cdb, 4)),
            op::PERSISTENT_RESERVE_OUT => cdb::be32(cdb, 5) as usize,
            _ => return None,
        })
    }

    /// Session ended: the nexus's RESERVE(6) reservation and medium-removal prevention are
    /// released; persistent reservations stay. No I_T NEXUS LOSS unit attention is queued for
    /// the lost nexus, so a session that is reinstated (e.g. after live migration) resumes
    /// without one.
    pub fn nexus_lost(&self, nexus: &ItNexus) {
        let mut st = self.lock_write();
        if st.reserve6.as_ref() == Some(nexus) {
            st.reserve6 = None;
        }
        if let Some(ns) = st.nexuses.get_mut(nexus) {
            ns.prevent = false;
            if !ns.lost {
                ns.lost = true;
                st.lost_order.push_back(nexus.clone());
            }
        }
        while st.lost_order.len() > MAX_LOST_NEXUSES {
            if let Some(old) = st.lost_order.pop_front() {
                st.nexuses.remove(&old);
            }
        }
        self.note_reservations(&st);
    }

    /// LOGICAL UNIT RESET task management function: clears RESERVE(6) and medium-removal
    /// prevention and queues BUS DEVICE RESET FUNCTION OCCURRED (29/03) to every known nexus,
    /// including the one that asked (SAM-5 hard reset; libiscsi's MultipathIO.Reset checks that
    /// every path sees a UA).
    pub fn logical_unit_reset(&self, by: &ItNexus) {
        self.reset(by, AscAscq::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    }

    /// Target warm or cold reset: as [`Self::logical_unit_reset`] with SCSI BUS RESET OCCURRED
    /// (29/02).
    pub fn target_reset(&self, by: &ItNexus) {
        self.reset(by, AscAscq::SCSI_BUS_RESET_OCCURRED);
    }

    fn reset(&self, by: &ItNexus, code: AscAscq) {
        tracing::info!(initiator = %by.initiator_port, ?code, "logical unit reset");
        let mut st = self.lock_write();
        st.reserve6 = None;
        for ns in st.nexuses.values_mut() {
            ns.prevent = false;
        }
        st.queue_ua_all_except(None, code);
        self.note_reservations(&st);
    }

    /// Queues CAPACITY DATA HAS CHANGED (2A/09) to every known nexus; call after the back-end
    /// was resized.
    pub fn capacity_changed(&self) {
        self.lock_write()
            .queue_ua_all_except(None, AscAscq::CAPACITY_DATA_HAS_CHANGED);
    }

    /// Runs `f` holding the stripe locks for `offset..offset+len`: shared for ordinary I/O,
    /// exclusive for commands that must be atomic against it. Stripes are taken in index order,
    /// so holders never deadlock.
    fn with_stripes<R>(&self, offset: u64, len: u64, exclusive: bool, f: impl FnOnce() -> R) -> R {
        self.lock_stripes(stripe_mask(offset, len), exclusive, f)
    }

    fn lock_stripes<R>(&self, mask: u64, exclusive: bool, f: impl FnOnce() -> R) -> R {
        if mask == 0 {
            return f();
        }
        let i = mask.trailing_zeros() as usize;
        let rest = mask & (mask - 1);
        if exclusive {
            let _g = self.stripes[i].write().unwrap_or_else(|e| e.into_inner());
            self.lock_stripes(rest, true, f)
        } else {
            let _g = self.stripes[i].read().unwrap_or_else(|e| e.into_inner());
            self.lock_stripes(rest, false, f)
        }
    }
}

fn stripe_mask(offset: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = offset >> STRIPE_SHIFT;
    let last = offset.saturating_add(len - 1) >> STRIPE_SHIFT;
    if last - first >= STRIPES as u64 - 1 {
        return u64::MAX;
    }
    (first..=last).fold(0u64, |m, g| m | 1 << (g % STRIPES as u64))
}

/// Truncates `data` to the allocation length.
pub(crate) fn truncate(mut data: Vec<u8>, alloc: usize) -> Vec<u8> {
    data.truncate(alloc);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_masks() {
        assert_eq!(stripe_mask(0, 0), 0);
        assert_eq!(stripe_mask(0, 512), 1);
        assert_eq!(stripe_mask((1 << STRIPE_SHIFT) - 512, 1024), 0b11);
        assert_eq!(
            stripe_mask(63 << STRIPE_SHIFT, 2 << STRIPE_SHIFT),
            1 | 1 << 63
        );
        assert_eq!(stripe_mask(0, 64 << STRIPE_SHIFT), u64::MAX);
        assert_eq!(stripe_mask(u64::MAX - 10, 100), 1 << 63);
    }
}

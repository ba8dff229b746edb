//! Seed inputs for the fuzz targets, built from realistic PDUs and CDBs: the keys libiscsi,
//! open-iscsi and tgt put in their logins, the commands a Linux initiator sends, and the SCSI
//! commands of libiscsi's test suite. `tests/generate_corpus.rs` writes them to `fuzz/corpus/`.

use iscsi_proto::keys;
use iscsi_wire::pdu::ahs;
use iscsi_wire::*;

use crate::{BATCH_SEPARATOR, CHAP_R_AUTO, CHAP_USER};

mod initiator;

/// libiscsi's test-tool initiator name.
pub const INITIATOR_NAME: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";
/// An open-iscsi style initiator name.
pub const OPEN_ISCSI_NAME: &str = "iqn.1994-05.com.redhat:5f8d2d7b8c1";
/// The target every portal of the fuzz harness serves.
pub const TARGET_NAME: &str = "iqn.2024-01.org.viscsi:disk0";
/// A target whose access list does not include our initiators.
pub const RESTRICTED_TARGET_NAME: &str = "iqn.2024-01.org.viscsi:restricted";
/// Fixed-format sense: ILLEGAL REQUEST, INVALID FIELD IN CDB.
pub const SENSE_INVALID_FIELD: [u8; 18] = [
    0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0,
];

const ISID: Isid = Isid(0x0002_3d00_0001);

/// One seed file: `fuzz/corpus/<target>/<name>`.
#[derive(Clone, Debug)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    out.extend(pdu_stream_seeds());
    out.extend(text_negotiation_seeds());
    out.extend(target_login_seeds());
    out.extend(target_full_feature_seeds());
    out.extend(scsi_cdb_seeds());
    out.extend(initiator::all());
    out
}

fn seed(target: &'static str, name: &str, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        name: name.to_owned(),
        bytes,
    }
}

// -------------------------------------------------------------------------------------------
// PDU builders
// -------------------------------------------------------------------------------------------

/// Bytes of consecutive PDUs, framed with the digests in force.
#[derive(Clone, Debug, Default)]
pub struct Wire {
    pub bytes: Vec<u8>,
    pub limits: FrameLimits,
}

impl Wire {
    pub fn new() -> Self {
        Wire::default()
    }

    pub fn digests(mut self, header: bool, data: bool) -> Self {
        self.limits.header_digest = header;
        self.limits.data_digest = data;
        self
    }

    pub fn pdu(&mut self, bhs: Bhs, data: &[u8]) -> &mut Self {
        self.pdu_ahs(bhs, &[], data)
    }

    pub fn pdu_ahs(&mut self, bhs: Bhs, ahs: &[u8], data: &[u8]) -> &mut Self {
        encode_pdu(&bhs, ahs, data, self.limits, &mut self.bytes);
        self
    }

    /// Switches digests on or off for the PDUs that follow (as after login).
    pub fn set_digests(&mut self, header: bool, data: bool) -> &mut Self {
        self.limits.header_digest = header;
        self.limits.data_digest = data;
        self
    }

    pub fn text_pdu(&mut self, bhs: Bhs, pairs: &[(&str, &str)]) -> &mut Self {
        self.pdu(bhs, &keys::encode_text(pairs))
    }
}

/// A Login Request (CSG/NSG as wire bits: 0 security, 1 operational, 3 full feature).
pub fn login(csg: u8, nsg: u8, transit: bool, continue_: bool, tsih: u16) -> Bhs {
    LoginRequest {
        transit,
        continue_,
        csg,
        nsg: if transit { nsg } else { 0 },
        version_max: 0,
        version_min: 0,
        isid: ISID,
        tsih,
        itt: 0x10,
        cid: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
    }
    .to_bhs()
}

/// A SCSI Command with a CDB of up to 16 bytes (longer CDBs go to [`scsi_cmd_ahs`]).
pub fn scsi_cmd(itt: u32, cmd_sn: u32, read: bool, write: bool, edtl: u32, cdb: &[u8]) -> Bhs {
    let mut c = [0u8; 16];
    let n = cdb.len().min(16);
    c[..n].copy_from_slice(&cdb[..n]);
    ScsiCommand {
        immediate: false,
        final_: true,
        read,
        write,
        attr: 1,
        lun: 0,
        itt,
        expected_data_transfer_length: edtl,
        cmd_sn,
        exp_stat_sn: 0,
        cdb: c,
    }
    .to_bhs()
}

/// A SCSI Command whose CDB is longer than 16 bytes: the rest goes in an extended-CDB AHS.
pub fn scsi_cmd_ahs(itt: u32, cmd_sn: u32, read: bool, edtl: u32, cdb: &[u8]) -> (Bhs, Vec<u8>) {
    let bhs = scsi_cmd(itt, cmd_sn, read, false, edtl, cdb);
    let mut area = Vec::new();
    let mut specific = vec![0u8];
    specific.extend_from_slice(cdb.get(16..).unwrap_or_default());
    ahs::encode(ahs::EXTENDED_CDB, &specific, &mut area);
    if read {
        let mut bidi = vec![0u8];
        bidi.extend_from_slice(&edtl.to_be_bytes());
        ahs::encode(ahs::BIDI_READ_DATA_LENGTH, &bidi, &mut area);
    }
    (bhs, area)
}

pub fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, final_: bool) -> Bhs {
    DataOut {
        final_,
        lun: 0,
        itt,
        ttt,
        exp_stat_sn: 0,
        data_sn,
        buffer_offset: offset,
    }
    .to_bhs()
}

pub fn nop_out(itt: u32, ttt: u32, cmd_sn: u32, immediate: bool) -> Bhs {
    NopOut {
        immediate,
        lun: 0,
        itt,
        ttt,
        cmd_sn,
        exp_stat_sn: 0,
    }
    .to_bhs()
}

pub fn tmf(function: TmfFunction, itt: u32, cmd_sn: u32, referenced: u32, ref_cmd_sn: u32) -> Bhs {
    TaskMgmtRequest {
        immediate: true,
        function,
        lun: 0,
        itt,
        referenced_task_tag: referenced,
        cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn,
        exp_data_sn: 0,
    }
    .to_bhs()
}

pub fn text_req(itt: u32, ttt: u32, cmd_sn: u32) -> Bhs {
    TextRequest {
        immediate: false,
        final_: true,
        continue_: false,
        lun: 0,
        itt,
        ttt,
        cmd_sn,
        exp_stat_sn: 0,
    }
    .to_bhs()
}

pub fn logout(itt: u32, cmd_sn: u32, reason: LogoutReason) -> Bhs {
    LogoutRequest {
        immediate: true,
        reason,
        itt,
        cid: 0,
        cmd_sn,
        exp_stat_sn: 0,
    }
    .to_bhs()
}

pub fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

pub fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

pub fn rw16(opcode: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![opcode, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn rw12(opcode: u8, lba: u32, blocks: u32) -> Vec<u8> {
    let mut c = vec![opcode, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

// -------------------------------------------------------------------------------------------
// Login key sets seen from real initiators and targets
// -------------------------------------------------------------------------------------------

/// libiscsi's first Login Request of a normal session.
pub fn libiscsi_security(auth: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("InitiatorName", INITIATOR_NAME),
        ("InitiatorAlias", "iscsi-test"),
        ("TargetName", TARGET_NAME),
        ("SessionType", "Normal"),
        ("AuthMethod", auth),
    ]
}

/// libiscsi's operational-stage keys.
pub fn libiscsi_operational() -> Vec<(&'static str, &'static str)> {
    vec![
        ("HeaderDigest", "None,CRC32C"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]
}

/// open-iscsi's operational-stage keys (iscsid defaults).
pub fn open_iscsi_operational() -> Vec<(&'static str, &'static str)> {
    vec![
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]
}

/// Small limits, so that Data-In, R2Ts and text responses are split.
pub fn small_operational() -> Vec<(&'static str, &'static str)> {
    vec![
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "No"),
        ("MaxBurstLength", "1024"),
        ("FirstBurstLength", "512"),
        ("MaxOutstandingR2T", "2"),
        ("MaxRecvDataSegmentLength", "512"),
    ]
}

/// tgt's answers to an operational-stage offer.
pub fn tgt_operational_answers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "8192"),
        ("TargetAlias", "tgt-disk"),
    ]
}

/// A whole login of a normal session: security stage with `security` keys, then operational
/// stage with `operational` keys, ending in full feature phase.
pub fn normal_login(w: &mut Wire, security: &[(&str, &str)], operational: &[(&str, &str)]) {
    w.text_pdu(login(0, 1, true, false, 0), security);
    w.text_pdu(login(1, 3, true, false, 0), operational);
}

/// The logins that bring [`crate::target_full_feature`] to full feature phase: 0 libiscsi,
/// 1 open-iscsi (InitialR2T=No), 2 small limits (ImmediateData=No), 3 discovery session.
pub fn canned_login(variant: u8) -> Vec<u8> {
    let mut w = Wire::new();
    match variant & 3 {
        0 => normal_login(&mut w, &libiscsi_security("None"), &libiscsi_operational()),
        1 => {
            let mut ops = open_iscsi_operational();
            ops.retain(|(k, _)| *k != "MaxOutstandingR2T");
            ops.push(("MaxOutstandingR2T", "4"));
            normal_login(&mut w, &libiscsi_security("CHAP,None"), &ops)
        }
        2 => normal_login(&mut w, &libiscsi_security("None"), &small_operational()),
        _ => normal_login(
            &mut w,
            &[
                ("InitiatorName", OPEN_ISCSI_NAME),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ],
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "32768"),
            ],
        ),
    }
    w.bytes
}

// -------------------------------------------------------------------------------------------
// Full feature phase conversations (CmdSN starts at 1 after the canned login)
// -------------------------------------------------------------------------------------------

/// Appends READ and WRITE traffic: read, write with immediate data, write solicited by R2T
/// (the first TTT the target hands out is 1), NOP-Out ping.
fn io_traffic(w: &mut Wire, first_cmd_sn: u32, next_ttt: u32) -> u32 {
    let mut sn = first_cmd_sn;
    w.pdu(scsi_cmd(0x100, sn, true, false, 4096, &read10(0, 8)), &[]);
    sn += 1;
    w.pdu(
        scsi_cmd(0x104, sn, false, true, 512, &write10(8, 1)),
        &[0xa5; 512],
    );
    sn += 1;
    // Write of 2 blocks with no immediate data: answered by an R2T.
    w.pdu(scsi_cmd(0x108, sn, false, true, 1024, &write10(16, 2)), &[]);
    sn += 1;
    w.pdu(data_out(0x108, next_ttt, 0, 0, false), &[1; 512]);
    w.pdu(data_out(0x108, next_ttt, 1, 512, true), &[2; 512]);
    w.pdu(nop_out(0x10c, RESERVED_TAG, sn, true), b"ping");
    sn
}

fn full_feature(variant: u8, opts: u8, build: impl FnOnce(&mut Wire)) -> Vec<u8> {
    let mut w = Wire::new();
    build(&mut w);
    let mut bytes = vec![(variant << 6) | (opts & 0x3f)];
    bytes.extend_from_slice(&w.bytes);
    bytes
}

fn target_full_feature_seeds() -> Vec<Seed> {
    const T: &str = "target_full_feature";
    let mut v = Vec::new();
    v.push(seed(
        T,
        "read10",
        full_feature(0, 0, |w| {
            w.pdu(scsi_cmd(1, 1, true, false, 4096, &read10(0, 8)), &[]);
        }),
    ));
    v.push(seed(
        T,
        "read16-underflow",
        full_feature(0, 0, |w| {
            w.pdu(scsi_cmd(5, 1, true, false, 65536, &rw16(0x88, 0, 128)), &[]);
        }),
    ));
    v.push(seed(
        T,
        "read-check-condition",
        full_feature(0, 0, |w| {
            w.pdu(
                scsi_cmd(3, 1, true, false, 512, &read10(0xffff_fff0, 1)),
                &[],
            );
        }),
    ));
    v.push(seed(
        T,
        "write-immediate",
        full_feature(0, 0, |w| {
            w.pdu(
                scsi_cmd(4, 1, false, true, 1024, &write10(0, 2)),
                &[0x5a; 1024],
            );
        }),
    ));
    v.push(seed(
        T,
        "write-r2t",
        full_feature(0, 0, |w| {
            w.pdu(scsi_cmd(8, 1, false, true, 2048, &write10(0, 4)), &[]);
            w.pdu(data_out(8, 1, 0, 0, false), &[1; 1024]);
            w.pdu(data_out(8, 1, 1, 1024, true), &[2; 1024]);
        }),
    ));
    v.push(seed(
        T,
        "write-immediate-then-r2t",
        full_feature(0, 0, |w| {
            w.pdu(
                scsi_cmd(12, 1, false, true, 2048, &write10(0, 4)),
                &[3; 512],
            );
            w.pdu(data_out(12, 1, 0, 512, true), &[4; 1536]);
        }),
    ));
    v.push(seed(
        T,
        "write-unsolicited",
        full_feature(1, 0, |w| {
            let mut cmd = ScsiCommand::parse(&scsi_cmd(16, 1, false, true, 2048, &write10(0, 4)));
            cmd.final_ = false;
            w.pdu(cmd.to_bhs(), &[5; 512]);
            w.pdu(data_out(16, RESERVED_TAG, 0, 512, false), &[6; 512]);
            w.pdu(data_out(16, RESERVED_TAG, 1, 1024, true), &[7; 1024]);
        }),
    ));
    v.push(seed(
        T,
        "write-multiple-r2t",
        full_feature(2, 0, |w| {
            // MaxBurstLength 1024, MaxOutstandingR2T 2: two R2Ts (TTT 1 and 2) at once.
            w.pdu(scsi_cmd(20, 1, false, true, 2048, &write10(0, 4)), &[]);
            for (i, ttt) in [1u32, 2].iter().enumerate() {
                for j in 0..2u32 {
                    let off = i as u32 * 1024 + j * 512;
                    w.pdu(data_out(20, *ttt, j, off, j == 1), &[i as u8; 512]);
                }
            }
        }),
    ));
    v.push(seed(
        T,
        "read-split-small-mrdsl",
        full_feature(2, 0, |w| {
            w.pdu(scsi_cmd(24, 1, true, false, 4096, &read10(0, 8)), &[]);
        }),
    ));
    v.push(seed(
        T,
        "data-out-bad-offset",
        full_feature(0, 0, |w| {
            w.pdu(scsi_cmd(28, 1, false, true, 1024, &write10(0, 2)), &[]);
            w.pdu(data_out(28, 1, 0, 4096, true), &[1; 512]);
        }),
    ));
    v.push(seed(
        T,
        "nop-ping",
        full_feature(0, 0, |w| {
            w.pdu(nop_out(1, RESERVED_TAG, 1, true), b"libiscsi ping data");
            w.pdu(nop_out(2, RESERVED_TAG, 1, false), &[]);
        }),
    ));
    v.push(seed(
        T,
        "nop-timeout-reply",
        full_feature(0, 3, |w| {
            // 6 s between PDUs: the target pings (TTT 1) and the initiator answers it.
            w.pdu(nop_out(1, RESERVED_TAG, 1, true), &[]);
            w.pdu(nop_out(RESERVED_TAG, 1, 1, true), &[]);
            w.pdu(nop_out(RESERVED_TAG, 2, 1, true), &[]);
        }),
    ));
    v.push(seed(
        T,
        "tmf-abort-task",
        full_feature(0, 4, |w| {
            w.pdu(scsi_cmd(0x40, 1, true, false, 512, &read10(0, 1)), &[]);
            w.pdu(scsi_cmd(0x44, 2, true, false, 512, &read10(1, 1)), &[]);
            w.pdu(tmf(TmfFunction::ABORT_TASK, 0x48, 3, 0x44, 2), &[]);
            w.pdu(tmf(TmfFunction::ABORT_TASK, 0x4c, 3, 0x99, 2), &[]);
        }),
    ));
    v.push(seed(
        T,
        "tmf-lun-reset",
        full_feature(0, 4, |w| {
            w.pdu(scsi_cmd(0x50, 1, false, true, 1024, &write10(0, 2)), &[]);
            w.pdu(
                tmf(TmfFunction::LOGICAL_UNIT_RESET, 0x54, 2, RESERVED_TAG, 0),
                &[],
            );
            w.pdu(
                tmf(TmfFunction::TARGET_WARM_RESET, 0x58, 2, RESERVED_TAG, 0),
                &[],
            );
            w.pdu(data_out(0x50, 1, 0, 0, true), &[0; 1024]);
        }),
    ));
    v.push(seed(
        T,
        "tmf-others",
        full_feature(0, 0, |w| {
            for (i, f) in [
                TmfFunction::ABORT_TASK_SET,
                TmfFunction::CLEAR_ACA,
                TmfFunction::CLEAR_TASK_SET,
                TmfFunction::TARGET_COLD_RESET,
                TmfFunction::TASK_REASSIGN,
                TmfFunction(0x7f),
            ]
            .into_iter()
            .enumerate()
            {
                w.pdu(tmf(f, 0x60 + i as u32, 1, RESERVED_TAG, 0), &[]);
            }
        }),
    ));
    v.push(seed(
        T,
        "text-sendtargets",
        full_feature(0, 0, |w| {
            w.text_pdu(text_req(0x70, RESERVED_TAG, 1), &[("SendTargets", "")]);
            w.text_pdu(
                text_req(0x71, RESERVED_TAG, 2),
                &[("SendTargets", TARGET_NAME)],
            );
        }),
    ));
    v.push(seed(
        T,
        "text-discovery-all",
        full_feature(3, 0, |w| {
            w.text_pdu(text_req(0x72, RESERVED_TAG, 1), &[("SendTargets", "All")]);
            w.pdu(logout(0x73, 2, LogoutReason::CLOSE_SESSION), &[]);
        }),
    ));
    v.push(seed(
        T,
        "text-renegotiate",
        full_feature(0, 0, |w| {
            w.text_pdu(
                text_req(0x74, RESERVED_TAG, 1),
                &[
                    ("MaxRecvDataSegmentLength", "65536"),
                    ("X-com.example.vendor", "1"),
                    ("MaxConnections", "2"),
                ],
            );
            w.text_pdu(text_req(0x75, RESERVED_TAG, 2), &[("DataDigest", "CRC32C")]);
        }),
    ));
    v.push(seed(
        T,
        "cmdsn-out-of-order",
        full_feature(0, 0, |w| {
            w.pdu(scsi_cmd(0x80, 3, true, false, 512, &read10(2, 1)), &[]);
            w.pdu(scsi_cmd(0x81, 2, true, false, 512, &read10(1, 1)), &[]);
            w.pdu(scsi_cmd(0x82, 100, true, false, 512, &read10(1, 1)), &[]);
            w.pdu(scsi_cmd(0x83, 1, true, false, 512, &read10(0, 1)), &[]);
        }),
    ));
    v.push(seed(
        T,
        "duplicate-itt",
        full_feature(0, 4, |w| {
            w.pdu(scsi_cmd(0x90, 1, true, false, 512, &read10(0, 1)), &[]);
            w.pdu(scsi_cmd(0x90, 2, true, false, 512, &read10(0, 1)), &[]);
        }),
    ));
    v.push(seed(
        T,
        "extended-cdb",
        full_feature(0, 0, |w| {
            let mut cdb = vec![0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09];
            cdb.resize(32, 0);
            let (bhs, area) = scsi_cmd_ahs(0x94, 1, true, 512, &cdb);
            w.pdu_ahs(bhs, &area, &[]);
        }),
    ));
    v.push(seed(
        T,
        "bad-pdus",
        full_feature(0, 0, |w| {
            let mut unknown = Bhs::default();
            unknown.0[0] = 0x1c;
            w.pdu(unknown, &[]);
            let snack = SnackRequest {
                snack_type: SnackType::STATUS,
                itt: 1,
                ..Default::default()
            };
            w.pdu(snack.to_bhs(), &[]);
            w.pdu(login(1, 3, true, false, 1), &[]);
            w.pdu(NopIn::default().to_bhs(), &[]);
            w.pdu(data_out(0x1234, RESERVED_TAG, 0, 0, true), &[0; 512]);
        }),
    ));
    v.push(seed(
        T,
        "io-mix",
        full_feature(1, 2, |w| {
            let sn = io_traffic(w, 1, 1);
            w.pdu(logout(0x1ff, sn, LogoutReason::CLOSE_CONNECTION), &[]);
        }),
    ));
    v.push(seed(
        T,
        "logout-recovery",
        full_feature(0, 0, |w| {
            w.pdu(
                logout(0x200, 1, LogoutReason::REMOVE_CONNECTION_FOR_RECOVERY),
                &[],
            );
            w.pdu(logout(0x201, 1, LogoutReason::CLOSE_SESSION), &[]);
        }),
    ));
    v.push(seed(
        T,
        "no-data-commands",
        full_feature(0, 0, |w| {
            w.pdu(
                scsi_cmd(0x300, 1, false, false, 0, &[0, 0, 0, 0, 0, 0]),
                &[],
            );
            w.pdu(
                scsi_cmd(0x301, 2, true, false, 36, &[0x12, 0, 0, 0, 36, 0]),
                &[],
            );
            w.pdu(
                scsi_cmd(0x302, 3, true, false, 8, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                &[],
            );
            w.pdu(
                scsi_cmd(
                    0x303,
                    4,
                    false,
                    false,
                    0,
                    &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ),
                &[],
            );
        }),
    ));
    v
}

// -------------------------------------------------------------------------------------------
// Logins from the first byte
// -------------------------------------------------------------------------------------------

fn connection(opts: u8, build: impl FnOnce(&mut Wire)) -> Vec<u8> {
    let mut w = Wire::new();
    build(&mut w);
    let mut bytes = vec![opts];
    bytes.extend_from_slice(&w.bytes);
    bytes
}

/// Bit 5 of the first byte of a target_login input selects the CHAP-protected portal.
const CHAP_PORTAL: u8 = 0x20;

fn chap_security_keys(algorithms: &'static str) -> Vec<Vec<(&'static str, &'static str)>> {
    vec![
        libiscsi_security("CHAP,None"),
        vec![("CHAP_A", algorithms)],
        vec![("CHAP_N", CHAP_USER), ("CHAP_R", CHAP_R_AUTO)],
    ]
}

fn target_login_seeds() -> Vec<Seed> {
    const T: &str = "target_login";
    let mut v = Vec::new();
    v.push(seed(
        T,
        "libiscsi-login-read-logout",
        connection(0, |w| {
            normal_login(w, &libiscsi_security("None"), &libiscsi_operational());
            let sn = io_traffic(w, 1, 1);
            w.pdu(logout(0x1ff, sn, LogoutReason::CLOSE_SESSION), &[]);
        }),
    ));
    v.push(seed(
        T,
        "open-iscsi-login",
        connection(0, |w| {
            let mut sec = libiscsi_security("CHAP,None");
            sec[0].1 = OPEN_ISCSI_NAME;
            sec.retain(|(k, _)| *k != "InitiatorAlias");
            normal_login(w, &sec, &open_iscsi_operational());
            w.pdu(scsi_cmd(1, 1, false, false, 0, &[0; 6]), &[]);
        }),
    ));
    v.push(seed(
        T,
        "skip-security",
        connection(0, |w| {
            let mut keys = vec![
                ("InitiatorName", INITIATOR_NAME),
                ("TargetName", TARGET_NAME),
            ];
            keys.extend(libiscsi_operational());
            w.text_pdu(login(1, 3, true, false, 0), &keys);
            w.pdu(nop_out(1, RESERVED_TAG, 1, true), &[]);
        }),
    ));
    v.push(seed(
        T,
        "security-then-stay",
        connection(0, |w| {
            w.text_pdu(login(0, 0, false, false, 0), &libiscsi_security("None"));
            w.text_pdu(login(0, 1, true, false, 0), &[]);
            w.text_pdu(login(1, 1, false, false, 0), &libiscsi_operational());
            w.text_pdu(login(1, 3, true, false, 0), &[]);
        }),
    ));
    v.push(seed(
        T,
        "continued-text",
        connection(0, |w| {
            let text = keys::encode_text(&libiscsi_security("None"));
            let (a, b) = text.split_at(40);
            w.pdu(login(0, 0, false, true, 0), a);
            w.pdu(login(0, 1, true, false, 0), b);
            w.text_pdu(login(1, 3, true, false, 0), &small_operational());
        }),
    ));
    v.push(seed(
        T,
        "digests",
        connection(1, |w| {
            let mut ops = libiscsi_operational();
            ops[0] = ("HeaderDigest", "CRC32C,None");
            ops[1] = ("DataDigest", "CRC32C");
            normal_login(w, &libiscsi_security("None"), &ops);
            w.set_digests(true, true);
            let sn = io_traffic(w, 1, 1);
            w.pdu(logout(0x1ff, sn, LogoutReason::CLOSE_SESSION), &[]);
        }),
    ));
    v.push(seed(
        T,
        "header-digest-only",
        connection(0, |w| {
            let mut ops = libiscsi_operational();
            ops[0] = ("HeaderDigest", "CRC32C");
            normal_login(w, &libiscsi_security("None"), &ops);
            w.set_digests(true, false);
            w.pdu(scsi_cmd(1, 1, true, false, 512, &read10(0, 1)), &[]);
        }),
    ));
    v.push(seed(
        T,
        "discovery-sendtargets",
        connection(0, |w| {
            normal_login(
                w,
                &[
                    ("InitiatorName", OPEN_ISCSI_NAME),
                    ("SessionType", "Discovery"),
                    ("AuthMethod", "None"),
                ],
                &[
                    ("HeaderDigest", "None"),
                    ("DataDigest", "None"),
                    ("MaxRecvDataSegmentLength", "32768"),
                ],
            );
            w.text_pdu(text_req(1, RESERVED_TAG, 1), &[("SendTargets", "All")]);
            w.pdu(logout(2, 2, LogoutReason::CLOSE_SESSION), &[]);
        }),
    ));
    v.push(seed(
        T,
        "tgt-style-offers",
        connection(0, |w| {
            normal_login(w, &libiscsi_security("None"), &tgt_operational_answers());
        }),
    ));
    v.push(seed(
        T,
        "unknown-target",
        connection(0, |w| {
            w.text_pdu(
                login(0, 1, true, false, 0),
                &[
                    ("InitiatorName", INITIATOR_NAME),
                    ("TargetName", "iqn.2024-01.org.viscsi:nope"),
                    ("AuthMethod", "None"),
                ],
            );
        }),
    ));
    v.push(seed(
        T,
        "restricted-target",
        connection(0, |w| {
            w.text_pdu(
                login(0, 1, true, false, 0),
                &[
                    ("InitiatorName", INITIATOR_NAME),
                    ("TargetName", RESTRICTED_TARGET_NAME),
                    ("AuthMethod", "None"),
                ],
            );
        }),
    ));
    v.push(seed(
        T,
        "missing-initiator-name",
        connection(0, |w| {
            w.text_pdu(
                login(0, 1, true, false, 0),
                &[("TargetName", TARGET_NAME), ("AuthMethod", "None")],
            );
        }),
    ));
    v.push(seed(
        T,
        "bad-version-and-stage",
        connection(0, |w| {
            let mut req = LoginRequest::parse(&login(0, 1, true, false, 0));
            req.version_min = 1;
            req.version_max = 2;
            w.text_pdu(req.to_bhs(), &libiscsi_security("None"));
        }),
    ));
    v.push(seed(
        T,
        "bad-nsg",
        connection(0, |w| {
            w.text_pdu(login(0, 2, true, false, 0), &libiscsi_security("None"));
        }),
    ));
    v.push(seed(
        T,
        "non-login-first",
        connection(0, |w| {
            w.pdu(nop_out(1, RESERVED_TAG, 1, true), &[]);
        }),
    ));
    v.push(seed(
        T,
        "refused-session",
        connection(0x18, |w| {
            normal_login(w, &libiscsi_security("None"), &libiscsi_operational());
        }),
    ));
    v.push(seed(
        T,
        "auth-krb5-only",
        connection(0, |w| {
            w.text_pdu(login(0, 1, true, false, 0), &libiscsi_security("KRB5,SRP"));
        }),
    ));
    v.push(seed(
        T,
        "chap-md5",
        connection(CHAP_PORTAL, |w| {
            let keys = chap_security_keys("5");
            w.text_pdu(login(0, 0, false, false, 0), &keys[0]);
            w.text_pdu(login(0, 0, false, false, 0), &keys[1]);
            w.text_pdu(login(0, 1, true, false, 0), &keys[2]);
            w.text_pdu(login(1, 3, true, false, 0), &libiscsi_operational());
            w.pdu(scsi_cmd(1, 1, true, false, 512, &read10(0, 1)), &[]);
        }),
    ));
    v.push(seed(
        T,
        "chap-sha256-first-pdu",
        connection(CHAP_PORTAL, |w| {
            let mut first = libiscsi_security("CHAP,None");
            first.push(("CHAP_A", "7,6,5"));
            w.text_pdu(login(0, 0, false, false, 0), &first);
            w.text_pdu(
                login(0, 1, true, false, 0),
                &[("CHAP_N", CHAP_USER), ("CHAP_R", CHAP_R_AUTO)],
            );
            w.text_pdu(login(1, 3, true, false, 0), &open_iscsi_operational());
        }),
    ));
    v.push(seed(
        T,
        "chap-mutual",
        connection(CHAP_PORTAL, |w| {
            let keys = chap_security_keys("8,7,6,5");
            w.text_pdu(login(0, 0, false, false, 0), &keys[0]);
            w.text_pdu(login(0, 0, false, false, 0), &keys[1]);
            w.text_pdu(
                login(0, 1, true, false, 0),
                &[
                    ("CHAP_N", CHAP_USER),
                    ("CHAP_R", CHAP_R_AUTO),
                    ("CHAP_I", "77"),
                    ("CHAP_C", "0x5b2c7f0e9a4d31c688e6f1b20d4a7c93"),
                ],
            );
            w.text_pdu(login(1, 3, true, false, 0), &libiscsi_operational());
        }),
    ));
    v.push(seed(
        T,
        "chap-wrong-response",
        connection(CHAP_PORTAL, |w| {
            let keys = chap_security_keys("5");
            w.text_pdu(login(0, 0, false, false, 0), &keys[0]);
            w.text_pdu(login(0, 0, false, false, 0), &keys[1]);
            w.text_pdu(
                login(0, 1, true, false, 0),
                &[
                    ("CHAP_N", CHAP_USER),
                    ("CHAP_R", "0x00112233445566778899aabbccddeeff"),
                ],
            );
        }),
    ));
    v.push(seed(
        T,
        "chap-none-only",
        connection(CHAP_PORTAL, |w| {
            w.text_pdu(login(0, 1, true, false, 0), &libiscsi_security("None"));
        }),
    ));
    v.push(seed(
        T,
        "chap-skip-security",
        connection(CHAP_PORTAL, |w| {
            let mut keys = vec![
                ("InitiatorName", INITIATOR_NAME),
                ("TargetName", TARGET_NAME),
            ];
            keys.extend(libiscsi_operational());
            w.text_pdu(login(1, 3, true, false, 0), &keys);
        }),
    ));
    v.push(seed(
        T,
        "chap-base64-and-bad-alg",
        connection(CHAP_PORTAL, |w| {
            w.text_pdu(login(0, 0, false, false, 0), &libiscsi_security("CHAP"));
            w.text_pdu(login(0, 0, false, false, 0), &[("CHAP_A", "0x81,3")]);
            w.text_pdu(
                login(0, 1, true, false, 0),
                &[
                    ("CHAP_N", CHAP_USER),
                    ("CHAP_R", "0bAAECAwQFBgcICQoLDA0ODw=="),
                ],
            );
        }),
    ));
    v.push(seed(
        T,
        "timeout-after-login",
        connection(3, |w| {
            normal_login(w, &libiscsi_security("None"), &libiscsi_operational());
            w.pdu(nop_out(1, RESERVED_TAG, 1, true), &[]);
        }),
    ));
    v
}

// -------------------------------------------------------------------------------------------
// Text negotiation batches
// -------------------------------------------------------------------------------------------

fn batches(flags: u8, parts: &[(u8, Vec<(&str, &str)>)]) -> Vec<u8> {
    let mut out = vec![flags];
    for (i, (stage, pairs)) in parts.iter().enumerate() {
        if i > 0 {
            out.push(BATCH_SEPARATOR);
        }
        out.push(*stage);
        out.extend_from_slice(&keys::encode_text(pairs));
    }
    out
}

fn text_negotiation_seeds() -> Vec<Seed> {
    const T: &str = "text_negotiation";
    const SEC: u8 = 0;
    const OP: u8 = 1;
    const FF: u8 = 2;
    let tgt_security = vec![
        ("AuthMethod", "None"),
        ("TargetPortalGroupTag", "1"),
        ("TargetAlias", "tgt-disk"),
    ];
    let mut v = vec![
        seed(
            T,
            "libiscsi-login",
            batches(
                0,
                &[
                    (SEC, libiscsi_security("None")),
                    (OP, libiscsi_operational()),
                ],
            ),
        ),
        seed(
            T,
            "open-iscsi-login",
            batches(
                0,
                &[
                    (SEC, libiscsi_security("CHAP,None")),
                    (OP, open_iscsi_operational()),
                ],
            ),
        ),
        seed(
            T,
            "tgt-answers",
            batches(
                0,
                &[(SEC, tgt_security.clone()), (OP, tgt_operational_answers())],
            ),
        ),
        seed(
            T,
            "tgt-answers-crc",
            batches(2, &[(SEC, tgt_security), (OP, tgt_operational_answers())]),
        ),
        seed(T, "small-limits", batches(2, &[(OP, small_operational())])),
        seed(
            T,
            "discovery",
            batches(
                4,
                &[
                    (
                        SEC,
                        vec![
                            ("InitiatorName", OPEN_ISCSI_NAME),
                            ("SessionType", "Discovery"),
                            ("AuthMethod", "None"),
                        ],
                    ),
                    (
                        OP,
                        vec![
                            ("HeaderDigest", "None"),
                            ("DataDigest", "None"),
                            ("MaxRecvDataSegmentLength", "32768"),
                        ],
                    ),
                    (FF, vec![("SendTargets", "All")]),
                ],
            ),
        ),
        seed(
            T,
            "chap-keys",
            batches(
                0,
                &[
                    (SEC, libiscsi_security("CHAP,None")),
                    (SEC, vec![("CHAP_A", "5")]),
                    (
                        SEC,
                        vec![
                            ("CHAP_A", "5"),
                            ("CHAP_I", "1"),
                            ("CHAP_C", "0x0123456789abcdef0123456789abcdef"),
                        ],
                    ),
                    (
                        SEC,
                        vec![
                            ("CHAP_N", CHAP_USER),
                            ("CHAP_R", "0xfedcba98765432100123456789abcdef"),
                        ],
                    ),
                ],
            ),
        ),
        seed(
            T,
            "special-values",
            batches(
                0,
                &[(
                    OP,
                    vec![
                        ("HeaderDigest", "NotUnderstood"),
                        ("DataDigest", "Reject"),
                        ("InitialR2T", "Irrelevant"),
                        ("X-com.example.vendor.key", "value"),
                        ("X#org.example", "1"),
                        ("NewStandardKey", "Yes"),
                        ("OFMarkInt", "2048~8192"),
                        ("IFMarkInt", "Reject"),
                        ("OFMarker", "Yes"),
                    ],
                )],
            ),
        ),
        seed(
            T,
            "numbers",
            batches(
                1,
                &[(
                    OP,
                    vec![
                        ("MaxRecvDataSegmentLength", "0x2000"),
                        ("MaxBurstLength", "0X1000000"),
                        ("FirstBurstLength", "99999999"),
                        ("DefaultTime2Wait", "3601"),
                        ("DefaultTime2Retain", "0"),
                        ("MaxOutstandingR2T", "65535"),
                        ("MaxConnections", "0"),
                        ("ErrorRecoveryLevel", "2"),
                    ],
                )],
            ),
        ),
        seed(
            T,
            "booleans",
            batches(
                2,
                &[(
                    OP,
                    vec![
                        ("InitialR2T", "No"),
                        ("ImmediateData", "No"),
                        ("DataPDUInOrder", "No"),
                        ("DataSequenceInOrder", "Maybe"),
                    ],
                )],
            ),
        ),
        seed(
            T,
            "full-feature-keys",
            batches(
                0,
                &[
                    (FF, vec![("MaxRecvDataSegmentLength", "65536")]),
                    (FF, vec![("SendTargets", TARGET_NAME)]),
                    (FF, vec![("MaxConnections", "2")]),
                ],
            ),
        ),
        seed(
            T,
            "rfc7144-keys",
            batches(
                0,
                &[(
                    OP,
                    vec![
                        ("iSCSIProtocolLevel", "1"),
                        ("TaskReporting", "ResponseFence,RFC3720"),
                        ("iSERHelloRequired", "No"),
                    ],
                )],
            ),
        ),
        seed(
            T,
            "duplicates-across-batches",
            batches(
                0,
                &[(OP, libiscsi_operational()), (OP, libiscsi_operational())],
            ),
        ),
        seed(
            T,
            "wrong-sender",
            batches(
                1,
                &[
                    (
                        SEC,
                        vec![("TargetAlias", "x"), ("TargetAddress", "10.0.0.1:3260,1")],
                    ),
                    (OP, vec![("InitiatorAlias", "y")]),
                ],
            ),
        ),
    ];
    let mut raw = vec![0u8, OP];
    raw.extend_from_slice(b"HeaderDigest=None\0\0\0");
    v.push(seed(T, "trailing-nuls", raw));
    let mut raw = vec![0u8, SEC];
    raw.extend_from_slice(b"InitiatorName=iqn.x\0\0TargetName=y");
    v.push(seed(T, "empty-pair", raw));
    v
}

// -------------------------------------------------------------------------------------------
// Raw PDU streams
// -------------------------------------------------------------------------------------------

fn every_opcode(w: &mut Wire) {
    w.text_pdu(login(0, 1, true, false, 0), &libiscsi_security("CHAP,None"));
    let resp = LoginResponse {
        transit: true,
        csg: 0,
        nsg: 1,
        isid: ISID,
        tsih: 0,
        itt: 0x10,
        stat_sn: 0,
        exp_cmd_sn: 1,
        max_cmd_sn: 16,
        status: LoginStatus::SUCCESS,
        ..Default::default()
    };
    w.text_pdu(
        resp.to_bhs(),
        &[("AuthMethod", "None"), ("TargetPortalGroupTag", "1")],
    );
    w.pdu(scsi_cmd(1, 1, true, false, 4096, &read10(0, 8)), &[]);
    let din = DataIn {
        final_: true,
        status: Some(Status::GOOD),
        itt: 1,
        ttt: RESERVED_TAG,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 17,
        ..Default::default()
    };
    w.pdu(din.to_bhs(), &[0x42; 256]);
    w.pdu(
        scsi_cmd(2, 2, false, true, 512, &write10(0, 1)),
        &[0x24; 128],
    );
    let r2t = R2t {
        itt: 2,
        ttt: 1,
        stat_sn: 2,
        exp_cmd_sn: 3,
        max_cmd_sn: 18,
        r2t_sn: 0,
        buffer_offset: 128,
        desired_data_transfer_length: 384,
        ..Default::default()
    };
    w.pdu(r2t.to_bhs(), &[]);
    w.pdu(data_out(2, 1, 0, 128, true), &[0x24; 384]);
    let resp = ScsiResponse {
        itt: 2,
        stat_sn: 2,
        exp_cmd_sn: 3,
        max_cmd_sn: 18,
        ..Default::default()
    };
    w.pdu(resp.to_bhs(), &[]);
    let sense = ScsiResponse {
        itt: 3,
        status: Status::CHECK_CONDITION,
        underflow: true,
        residual_count: 512,
        ..Default::default()
    };
    let mut seg = vec![0, 18];
    seg.extend_from_slice(&SENSE_INVALID_FIELD);
    w.pdu(sense.to_bhs(), &seg);
    w.pdu(nop_out(4, RESERVED_TAG, 3, true), b"ping");
    w.pdu(
        NopIn {
            itt: 4,
            ttt: RESERVED_TAG,
            stat_sn: 3,
            exp_cmd_sn: 3,
            max_cmd_sn: 18,
            lun: 0,
        }
        .to_bhs(),
        b"ping",
    );
    w.pdu(tmf(TmfFunction::ABORT_TASK, 5, 3, 2, 2), &[]);
    w.pdu(
        TaskMgmtResponse {
            response: TmfResponse::TASK_DOES_NOT_EXIST,
            itt: 5,
            stat_sn: 4,
            exp_cmd_sn: 3,
            max_cmd_sn: 18,
        }
        .to_bhs(),
        &[],
    );
    w.text_pdu(text_req(6, RESERVED_TAG, 3), &[("SendTargets", "All")]);
    let tr = TextResponse {
        final_: true,
        itt: 6,
        ttt: RESERVED_TAG,
        stat_sn: 5,
        exp_cmd_sn: 4,
        max_cmd_sn: 19,
        ..Default::default()
    };
    w.text_pdu(
        tr.to_bhs(),
        &[
            ("TargetName", TARGET_NAME),
            ("TargetAddress", "127.0.0.1:3260,1"),
        ],
    );
    let am = AsyncMessage {
        async_event: AsyncEvent::LOGOUT_REQUESTED,
        parameter3: 5,
        stat_sn: 6,
        ..Default::default()
    };
    w.pdu(am.to_bhs(), &[]);
    let snack = SnackRequest {
        snack_type: SnackType::DATA_R2T,
        itt: 1,
        ttt: RESERVED_TAG,
        beg_run: 0,
        run_length: 0,
        ..Default::default()
    };
    w.pdu(snack.to_bhs(), &[]);
    let reject = Reject {
        reason: RejectReason::PROTOCOL_ERROR,
        stat_sn: 7,
        ..Default::default()
    };
    w.pdu(reject.to_bhs(), &snack.to_bhs().0);
    w.pdu(logout(7, 4, LogoutReason::CLOSE_SESSION), &[]);
    let lr = LogoutResponse {
        response: LogoutResponseCode::CLOSED_SUCCESSFULLY,
        itt: 7,
        stat_sn: 8,
        time2wait: 2,
        time2retain: 20,
        ..Default::default()
    };
    w.pdu(lr.to_bhs(), &[]);
}

fn stream(sel: u8, w: Wire) -> Vec<u8> {
    let mut out = vec![sel];
    out.extend_from_slice(&w.bytes);
    out
}

fn pdu_stream_seeds() -> Vec<Seed> {
    const T: &str = "pdu_stream";
    let mut v = Vec::new();
    for (hd, dd, name) in [
        (false, false, "no-digests"),
        (true, false, "header-digest"),
        (false, true, "data-digest"),
        (true, true, "both-digests"),
    ] {
        let mut w = Wire::new().digests(hd, dd);
        every_opcode(&mut w);
        v.push(seed(T, &format!("every-opcode-{name}"), stream(0, w)));
    }
    let mut w = Wire::new();
    normal_login(&mut w, &libiscsi_security("None"), &libiscsi_operational());
    v.push(seed(T, "login", stream(0, w)));
    let mut w = Wire::new();
    let mut cdb = vec![0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09];
    cdb.resize(32, 0);
    let (bhs, area) = scsi_cmd_ahs(1, 1, true, 512, &cdb);
    w.pdu_ahs(bhs, &area, &[]);
    let (bhs, area) = scsi_cmd_ahs(2, 2, false, 0, &[0x12; 17]);
    w.pdu_ahs(bhs, &area, &[]);
    v.push(seed(T, "extended-cdb-ahs", stream(0, w)));
    // An AHS whose length overruns its area.
    let mut w = Wire::new();
    w.pdu_ahs(
        scsi_cmd(3, 1, true, false, 512, &read10(0, 1)),
        &[0, 40, 1, 0],
        &[],
    );
    v.push(seed(T, "bad-ahs", stream(0, w)));
    // Data segment longer than the limit (selector 1: 512 bytes).
    let mut w = Wire::new();
    w.pdu(
        scsi_cmd(4, 1, false, true, 1024, &write10(0, 2)),
        &[9; 1024],
    );
    w.pdu(nop_out(5, RESERVED_TAG, 2, true), &[]);
    v.push(seed(T, "segment-too-long", stream(1, w)));
    // Data digest wrong on the first PDU, right on the second.
    let mut w = Wire::new().digests(false, true);
    w.pdu(nop_out(6, RESERVED_TAG, 1, true), b"abcd");
    let n = w.bytes.len();
    w.bytes[n - 1] ^= 0xff;
    w.pdu(nop_out(7, RESERVED_TAG, 2, true), b"efgh");
    v.push(seed(T, "bad-data-digest", stream(0, w)));
    // Header digest wrong: framing is lost.
    let mut w = Wire::new().digests(true, false);
    w.pdu(nop_out(8, RESERVED_TAG, 1, true), &[]);
    w.bytes[3] ^= 1;
    v.push(seed(T, "bad-header-digest", stream(0, w)));
    // Odd lengths, so padding matters.
    let mut w = Wire::new().digests(true, true);
    for len in [1usize, 2, 3, 5, 513] {
        w.pdu(nop_out(len as u32, RESERVED_TAG, 1, true), &vec![0x61; len]);
    }
    v.push(seed(T, "padding", stream(2, w)));
    // A truncated PDU at the end.
    let mut w = Wire::new();
    w.pdu(scsi_cmd(9, 1, false, true, 512, &write10(0, 1)), &[1; 512]);
    w.bytes.truncate(300);
    v.push(seed(T, "truncated", stream(0, w)));
    // A login split over continued PDUs, then a big (max selector) data segment.
    let mut w = Wire::new();
    let text = keys::encode_text(&libiscsi_operational());
    let (a, b) = text.split_at(100);
    w.pdu(login(1, 1, false, true, 0), a);
    w.pdu(login(1, 3, true, false, 0), b);
    v.push(seed(T, "continued-login", stream(3, w)));
    v
}

// -------------------------------------------------------------------------------------------
// SCSI commands
// -------------------------------------------------------------------------------------------

/// Control byte of a [`crate::scsi_cdb`] record: size the Data-Out to what the CDB asks for.
pub const AUTO_SIZE: u8 = 0x04;

/// One [`crate::scsi_cdb`] record.
pub fn cdb_record(out: &mut Vec<u8>, ctrl: u8, cdb: &[u8], data: &[u8]) {
    out.push(ctrl);
    out.push(cdb.len() as u8);
    out.extend_from_slice(cdb);
    out.extend_from_slice(&(data.len() as u16).to_le_bytes());
    out.extend_from_slice(data);
}

struct Cdbs(Vec<u8>);

impl Cdbs {
    fn new(flags: u8) -> Self {
        Cdbs(vec![flags])
    }
    /// A command from nexus (index % 2): the caller keeps the alternation in mind.
    fn cmd(mut self, cdb: &[u8], data: &[u8]) -> Self {
        cdb_record(&mut self.0, 0, cdb, data);
        self
    }
    fn ctrl(mut self, ctrl: u8, cdb: &[u8], data: &[u8]) -> Self {
        cdb_record(&mut self.0, ctrl, cdb, data);
        self
    }
}

fn alloc16(cdb: &mut [u8], at: usize, len: u16) {
    cdb[at..at + 2].copy_from_slice(&len.to_be_bytes());
}

fn pr_out(sa: u8, ty: u8, key: u64, sa_key: u64, flags: u8) -> (Vec<u8>, Vec<u8>) {
    let mut param = Vec::with_capacity(24);
    param.extend_from_slice(&key.to_be_bytes());
    param.extend_from_slice(&sa_key.to_be_bytes());
    param.extend_from_slice(&[0; 4]);
    param.push(flags);
    param.extend_from_slice(&[0; 3]);
    let mut cdb = vec![0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    cdb[5..9].copy_from_slice(&24u32.to_be_bytes());
    (cdb, param)
}

fn pr_in(sa: u8) -> Vec<u8> {
    vec![0x5e, sa, 0, 0, 0, 0, 0, 0x10, 0x00, 0]
}

fn unmap(ranges: &[(u64, u32)]) -> (Vec<u8>, Vec<u8>) {
    let desc_len = 16 * ranges.len();
    let mut param = Vec::new();
    param.extend_from_slice(&((6 + desc_len) as u16).to_be_bytes());
    param.extend_from_slice(&(desc_len as u16).to_be_bytes());
    param.extend_from_slice(&[0; 4]);
    for (lba, n) in ranges {
        param.extend_from_slice(&lba.to_be_bytes());
        param.extend_from_slice(&n.to_be_bytes());
        param.extend_from_slice(&[0; 4]);
    }
    let mut cdb = vec![0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    alloc16(&mut cdb, 7, param.len() as u16);
    (cdb, param)
}

fn scsi_cdb_seeds() -> Vec<Seed> {
    const T: &str = "scsi_cdb";
    let block = vec![0xabu8; 512];
    let two_blocks = [vec![0u8; 512], vec![0x11; 512]].concat();
    let mut v = Vec::new();
    let mut add = |name: &str, c: Cdbs| v.push(seed(T, name, c.0));

    add(
        "tur-inquiry",
        Cdbs::new(0)
            .cmd(&[0, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x12, 0, 0, 0, 0x60, 0], &[]),
    );
    let mut vpd = Cdbs::new(0);
    for page in [0x00u8, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2, 0xb3, 0xc0] {
        vpd = vpd.cmd(&[0x12, 1, page, 0x00, 0xff, 0], &[]);
    }
    add("inquiry-vpd", vpd);
    add(
        "inquiry-bad",
        Cdbs::new(0)
            .cmd(&[0x12, 0, 0x80, 0, 0xff, 0], &[])
            .cmd(&[0x12, 2, 0, 0, 5, 0], &[])
            .cmd(&[0x12], &[]),
    );
    add(
        "read-capacity",
        Cdbs::new(0)
            .cmd(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .cmd(
                &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                &[],
            ),
    );
    add(
        "read-capacity-4k",
        Cdbs::new(1).cmd(
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            &[],
        ),
    );
    add(
        "read6-write6",
        Cdbs::new(0)
            .cmd(&[0x0a, 0, 0, 1, 1, 0], &block)
            .cmd(&[0x08, 0, 0, 1, 1, 0], &[])
            .cmd(&[0x08, 0, 0, 0, 0, 0], &[]),
    );
    add(
        "read10-write10",
        Cdbs::new(0)
            .cmd(&write10(10, 1), &block)
            .cmd(&read10(10, 1), &[]),
    );
    add(
        "read12-write12",
        Cdbs::new(0)
            .cmd(&rw12(0xaa, 20, 1), &block)
            .cmd(&rw12(0xa8, 20, 1), &[]),
    );
    add(
        "read16-write16",
        Cdbs::new(0)
            .cmd(&rw16(0x8a, 30, 1), &block)
            .cmd(&rw16(0x88, 30, 1), &[]),
    );
    let mut fua = write10(40, 1);
    fua[1] = 0x08;
    add(
        "write-fua-4k",
        Cdbs::new(1)
            .ctrl(AUTO_SIZE, &fua, &[0x77])
            .cmd(&read10(40, 1), &[]),
    );
    add(
        "out-of-range",
        Cdbs::new(0)
            .cmd(&read10(0xffff_ffff, 1), &[])
            .cmd(&rw16(0x88, u64::MAX, 1), &[])
            .ctrl(AUTO_SIZE, &rw16(0x8a, 2047, 2), &[1])
            .cmd(&read10(0, 0xffff), &[]),
    );
    add(
        "write-short-data",
        Cdbs::new(0)
            .cmd(&write10(0, 4), &block)
            .cmd(&write10(0, 1), &two_blocks),
    );
    add(
        "read-only",
        Cdbs::new(0x10)
            .ctrl(AUTO_SIZE, &write10(0, 1), &[1])
            .cmd(&read10(0, 1), &[]),
    );
    let mut verify = vec![0x2f, 0x02, 0, 0, 0, 10, 0, 0, 1, 0];
    add(
        "verify-bytchk",
        Cdbs::new(0)
            .cmd(&write10(10, 1), &block)
            .cmd(&verify, &block),
    );
    verify[1] = 0x06;
    add(
        "verify-bytchk3",
        Cdbs::new(0)
            .cmd(&verify, &block)
            .cmd(&rw16(0x8f, 0, 8), &[]),
    );
    add(
        "write-and-verify",
        Cdbs::new(0)
            .ctrl(AUTO_SIZE, &[0x2e, 0x02, 0, 0, 0, 5, 0, 0, 2, 0], &[9])
            .cmd(&rw16(0x8e, 7, 1), &block),
    );
    add(
        "write-same",
        Cdbs::new(0)
            .cmd(&[0x41, 0, 0, 0, 0, 0, 0, 0, 16, 0], &block)
            .cmd(
                &[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                &block,
            )
            .cmd(
                &[0x93, 0x09, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 8, 0, 0],
                &[],
            )
            .cmd(&[0x93, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &block),
    );
    let (c, p) = unmap(&[(0, 8), (128, 128), (2040, 8)]);
    let (c2, p2) = unmap(&[(2047, 2)]);
    add(
        "unmap-get-lba-status",
        Cdbs::new(0)
            .ctrl(AUTO_SIZE, &write10(0, 256), &[0xee])
            .cmd(&c, &p)
            .cmd(
                &[0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
                &[],
            )
            .cmd(&c2, &p2),
    );
    add(
        "unmap-no-thin",
        Cdbs::new(0x02)
            .cmd(&c, &p)
            .cmd(&[0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[0, 2, 0, 0]),
    );
    let cw = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0];
    add(
        "compare-and-write",
        Cdbs::new(0)
            .cmd(&cw, &two_blocks)
            .cmd(&read10(3, 1), &[])
            .cmd(&cw, &two_blocks)
            .cmd(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0], &[]),
    );
    add(
        "orwrite-atomic",
        Cdbs::new(0)
            .cmd(&rw16(0x8b, 4, 1), &block)
            .cmd(&[0x9c, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0], &block),
    );
    add(
        "sync-prefetch",
        Cdbs::new(4)
            .cmd(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x91, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &[])
            .cmd(&[0x34, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], &[])
            .cmd(&[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &[]),
    );
    add(
        "mode-sense",
        Cdbs::new(0)
            .cmd(&[0x1a, 0x08, 0x3f, 0, 0xff, 0], &[])
            .cmd(&[0x1a, 0, 0x08, 0, 0xff, 0], &[])
            .cmd(&[0x1a, 0, 0x4a, 0, 0xff, 0], &[])
            .cmd(&[0x5a, 0, 0xff, 0xff, 0, 0, 0, 0x10, 0, 0], &[])
            .cmd(&[0x5a, 0x10, 0xbf, 0, 0, 0, 0, 0x10, 0, 0], &[])
            .cmd(&[0x1a, 0, 0x1c, 0, 0xff, 0], &[]),
    );
    let mut caching = vec![0, 0, 0, 0, 0x08, 0x12];
    caching.resize(4 + 20, 0);
    let mut control = vec![0, 0, 0, 0, 0, 0, 0, 0, 0x0a, 0x0a, 0x04];
    control.resize(8 + 12, 0);
    add(
        "mode-select",
        Cdbs::new(0)
            .cmd(&[0x15, 0x10, 0, 0, caching.len() as u8, 0], &caching)
            .cmd(&[0x1a, 0, 0x08, 0, 0xff, 0], &[])
            .cmd(
                &[0x55, 0x11, 0, 0, 0, 0, 0, 0, control.len() as u8, 0],
                &control,
            )
            .cmd(&read10(0xffff_ff00, 1), &[])
            .cmd(&[0x15, 0x10, 0, 0, 2, 0], &[0, 0]),
    );
    add(
        "report-luns-opcodes",
        Cdbs::new(0)
            .cmd(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[])
            .cmd(&[0xa0, 0, 2, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[])
            .cmd(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0], &[])
            .cmd(&[0xa3, 0x0c, 0x81, 0x28, 0, 0, 0, 0, 0x01, 0, 0, 0], &[])
            .cmd(&[0xa3, 0x0c, 0x02, 0x9e, 0, 0x10, 0, 0, 0x01, 0, 0, 0], &[])
            .cmd(&[0xa3, 0x0d, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], &[]),
    );
    add(
        "request-sense-ua",
        Cdbs::new(0)
            .ctrl(1, &[0, 0, 0, 0, 0, 0], &[])
            .cmd(&[0, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x03, 0, 0, 0, 0xfc, 0], &[])
            .ctrl(2, &[0x03, 1, 0, 0, 0xfc, 0], &[])
            .ctrl(3, &[0x12, 0, 0, 0, 0x24, 0], &[]),
    );
    let (reg_a, reg_a_p) = pr_out(0, 0, 0, 0x1111, 0);
    let (reg_b, reg_b_p) = pr_out(0, 0, 0, 0x2222, 0);
    let (res_a, res_a_p) = pr_out(1, 0x01, 0x1111, 0, 0);
    let (pre_b, pre_b_p) = pr_out(4, 0x03, 0x2222, 0x1111, 0);
    let (rel_b, rel_b_p) = pr_out(2, 0x03, 0x2222, 0, 0);
    let (clr_a, clr_a_p) = pr_out(3, 0, 0x1111, 0, 0);
    add(
        "persistent-reservations",
        Cdbs::new(0)
            .cmd(&reg_a, &reg_a_p)
            .cmd(&reg_b, &reg_b_p)
            .cmd(&res_a, &res_a_p)
            .cmd(&write10(0, 1), &block)
            .cmd(&pr_in(0), &[])
            .cmd(&pre_b, &pre_b_p)
            .cmd(&pr_in(1), &[])
            .cmd(&rel_b, &rel_b_p)
            .cmd(&pr_in(3), &[])
            .cmd(&pr_in(2), &[]),
    );
    add(
        "pr-clear-and-ignore",
        Cdbs::new(0)
            .cmd(&reg_a, &reg_a_p)
            .cmd(
                &pr_out(6, 0, 0, 0x3333, 0x05).0,
                &pr_out(6, 0, 0, 0x3333, 0x05).1,
            )
            .cmd(
                &pr_out(1, 0x08, 0x1111, 0, 0).0,
                &pr_out(1, 0x08, 0x1111, 0, 0).1,
            )
            .cmd(&clr_a, &clr_a_p)
            .cmd(
                &pr_out(5, 0x05, 0x1111, 0x3333, 0).0,
                &pr_out(5, 0x05, 0x1111, 0x3333, 0).1,
            ),
    );
    // REGISTER AND MOVE to the other nexus, with an iSCSI TransportID.
    let mut tid = vec![0x45, 0, 0, 0];
    let name = format!("{},i,0x00023d000002\0", "iqn.1994-05.com.redhat:peer");
    let mut name = name.into_bytes();
    name.resize(name.len().div_ceil(4) * 4, 0);
    tid[2..4].copy_from_slice(&(name.len() as u16).to_be_bytes());
    tid.extend_from_slice(&name);
    let mut mv = Vec::new();
    mv.extend_from_slice(&0x1111u64.to_be_bytes());
    mv.extend_from_slice(&0x4444u64.to_be_bytes());
    mv.extend_from_slice(&[0, 0]);
    mv.extend_from_slice(&2u16.to_be_bytes());
    mv.extend_from_slice(&(tid.len() as u32).to_be_bytes());
    mv.extend_from_slice(&tid);
    let mut mv_cdb = vec![0x5f, 7, 0x01, 0, 0, 0, 0, 0, 0, 0];
    mv_cdb[5..9].copy_from_slice(&(mv.len() as u32).to_be_bytes());
    add(
        "pr-register-and-move",
        Cdbs::new(0)
            .cmd(&reg_a, &reg_a_p)
            .cmd(&[0, 0, 0, 0, 0, 0], &[])
            .cmd(&res_a, &res_a_p)
            .cmd(&[0, 0, 0, 0, 0, 0], &[])
            .cmd(&mv_cdb, &mv)
            .cmd(&pr_in(3), &[]),
    );
    add(
        "reserve6-release6",
        Cdbs::new(0)
            .cmd(&[0x16, 0, 0, 0, 0, 0], &[])
            .cmd(&read10(0, 1), &[])
            .cmd(&[0x17, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .cmd(&read10(0, 1), &[]),
    );
    add(
        "removable-start-stop",
        Cdbs::new(0x08)
            .cmd(&[0x1e, 0, 0, 0, 1, 0], &[])
            .cmd(&[0x1b, 0, 0, 0, 0x02, 0], &[])
            .cmd(&[0x1e, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x1b, 0, 0, 0, 0x02, 0], &[])
            .cmd(&read10(0, 1), &[])
            .cmd(&[0x1b, 0, 0, 0, 0x03, 0], &[])
            .cmd(&[0x1b, 1, 0, 0, 0x01, 0], &[]),
    );
    add(
        "invalid-commands",
        Cdbs::new(0)
            .cmd(&[0xff, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x28, 0], &[])
            .cmd(&[], &[])
            .cmd(&[0x00, 0, 0, 0, 0, 0xff], &[])
            .cmd(
                &[
                    0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
                &[],
            )
            .cmd(&[0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x04, 0, 0, 0, 0, 0], &[])
            .cmd(&[0x4d, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]),
    );
    add(
        "defect-data-buffers",
        Cdbs::new(0)
            .cmd(&[0x37, 0, 0x18, 0, 0, 0, 0, 0, 0x10, 0], &[])
            .cmd(&[0xb7, 0, 0x18, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[])
            .cmd(&[0x3c, 0x03, 0, 0, 0, 0, 0, 0, 4, 0], &[]),
    );
    add(
        "big-transfer-small-max",
        Cdbs::new(0x20).cmd(&read10(0, 256), &[]).ctrl(
            AUTO_SIZE,
            &[0x93, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0, 0, 0],
            &[1],
        ),
    );
    add(
        "no-write-cache-4k",
        Cdbs::new(0x05)
            .ctrl(AUTO_SIZE, &write10(0, 2), &[3])
            .cmd(&read10(0, 2), &[])
            .cmd(&[0x1a, 0, 0x08, 0, 0xff, 0], &[]),
    );
    v
}

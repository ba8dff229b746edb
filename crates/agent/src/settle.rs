//! What a VM's session needs when it is logged in again on another path (a migration's
//! destination, a failover), before the VM's held commands go: the new session should look,
//! to the guest, like the one it had.
//!
//! - **Reconnect unit attentions.** Some targets (tgtd) greet every new session with UNIT
//!   ATTENTION 29h (power on, reset, I_T nexus loss). For the guest nothing was lost, so
//!   these are taken here with TEST UNIT READY. Any other unit attention found on the way
//!   (capacity, reservations, …) is kept and given to the guest's next command to that LUN.
//! - **Persistent reservations.** SPC-4 ties a registration to the initiator port
//!   (InitiatorName + ISID), which the new session keeps, so a conforming target sees the
//!   same I_T nexus. tgtd ties it to its session object instead, so after a new login the
//!   VM is no longer the holder. With the client's `reservation_key`, the key is
//!   registered again (REGISTER AND IGNORE EXISTING KEY) and, if the reservation is held
//!   with it, taken over with PREEMPT of the VM's own key: on a conforming target both are
//!   no-ops for the holder.
//!
//! Not here: reservations made with another key than the client's (the agent cannot know
//! them), and ACA.

use bytes::Bytes;
use datapath::{Command, DataPath, InitiatorClient, TaskAttr};

/// What [`settle`] did.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Reconnect unit attentions taken.
    pub absorbed: u32,
    /// Other unit attentions: (encoded LUN, sense), for the guest.
    pub kept: Vec<(u64, Bytes)>,
    /// What was done about the reservation, for the VM's history.
    pub reservation: Option<String>,
}

async fn run(
    path: &dyn DataPath,
    lun: u64,
    cdb: &[u8],
    out: &[u8],
    read_len: u32,
) -> Option<(u8, Bytes, Bytes)> {
    let command = Command {
        lun,
        cdb: Bytes::copy_from_slice(cdb),
        data_out: Bytes::copy_from_slice(out),
        read_len,
        attr: TaskAttr::Simple,
    };
    let c = path.submit(command).await.ok()?;
    Some((c.status.0, c.sense, c.data.to_bytes()))
}

/// Sense key and ASC of fixed or descriptor sense data.
fn key_and_asc(sense: &[u8]) -> Option<(u8, u8)> {
    match sense.first()? & 0x7f {
        0x70 | 0x71 => Some((sense.get(2)? & 0x0f, *sense.get(12)?)),
        0x72 | 0x73 => Some((sense.get(1)? & 0x0f, *sense.get(2)?)),
        _ => None,
    }
}

/// The LUNs to settle: the client's, else those REPORT LUNS lists (encoded).
async fn luns(path: &dyn DataPath, client: &InitiatorClient) -> Vec<u64> {
    if !client.luns.is_empty() {
        return client.luns.iter().map(|&l| scsi::lun::encode(l)).collect();
    }
    let cdb = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    for _ in 0..3 {
        if let Some((0, _, data)) = run(path, 0, &cdb, &[], 4096).await {
            return data
                .get(8..)
                .unwrap_or_default()
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
                .collect();
        }
    }
    vec![0]
}

pub(crate) async fn settle(path: &dyn DataPath, client: &InitiatorClient) -> Settled {
    let mut settled = Settled::default();
    let luns = luns(path, client).await;
    for &lun in &luns {
        for _ in 0..8 {
            let Some((status, sense, _)) = run(path, lun, &[0u8; 6], &[], 0).await else {
                break;
            };
            match (status, key_and_asc(&sense)) {
                (2, Some((6, 0x29))) => settled.absorbed += 1,
                (2, Some((6, _))) => settled.kept.push((lun, sense)),
                _ => break,
            }
        }
    }
    if let (Some(key), Some(&lun)) = (client.reservation_key_value(), luns.first()) {
        settled.reservation = restore_reservation(path, lun, key).await;
    }
    settled
}

/// PERSISTENT RESERVE OUT with a 24-byte parameter list.
fn pr_out(action: u8, kind: u8, key: u64, sa_key: u64) -> ([u8; 10], [u8; 24]) {
    let cdb = [0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut data = [0u8; 24];
    data[..8].copy_from_slice(&key.to_be_bytes());
    data[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (cdb, data)
}

async fn restore_reservation(path: &dyn DataPath, lun: u64, key: u64) -> Option<String> {
    // READ KEYS: nothing to do unless the VM registered its key.
    let (status, _, keys) =
        run(path, lun, &[0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], &[], 4096).await?;
    let registered = status == 0
        && keys
            .get(8..)
            .unwrap_or_default()
            .chunks_exact(8)
            .any(|k| u64::from_be_bytes(k.try_into().unwrap_or_default()) == key);
    if !registered {
        return None;
    }
    let (cdb, data) = pr_out(0x06, 0, 0, key);
    let (status, _, _) = run(path, lun, &cdb, &data, 0).await?;
    if status != 0 {
        return Some(format!(
            "re-registering the reservation key failed (status {status:#x})"
        ));
    }
    // READ RESERVATION: held with our key?
    let (status, _, r) = run(path, lun, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 24, 0], &[], 24).await?;
    let held = status == 0
        && r.len() >= 24
        && u32::from_be_bytes(r[4..8].try_into().unwrap_or_default()) >= 16
        && u64::from_be_bytes(r[8..16].try_into().unwrap_or_default()) == key;
    if !held {
        return Some("reservation key registered on the new session".into());
    }
    let kind = r[21] & 0x0f;
    let (cdb, data) = pr_out(0x04, kind, key, key);
    let (status, _, _) = run(path, lun, &cdb, &data, 0).await?;
    Some(if status == 0 {
        format!("reservation (type {kind}) kept on the new session")
    } else {
        format!("taking the reservation over failed (status {status:#x})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_formats() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x06;
        fixed[12] = 0x29;
        assert_eq!(key_and_asc(&fixed), Some((6, 0x29)));
        assert_eq!(key_and_asc(&[0x72, 0x06, 0x2a, 0x09]), Some((6, 0x2a)));
        assert_eq!(key_and_asc(&[]), None);
        assert_eq!(key_and_asc(&[0x70]), None);
        let (cdb, data) = pr_out(4, 1, 7, 8);
        assert_eq!(cdb[1], 4);
        assert_eq!(cdb[2], 1);
        assert_eq!(data[7], 7);
        assert_eq!(data[15], 8);
    }
}

//! One TCP connection: bytes in and out of a sans-IO `TargetConnection`, SCSI commands
//! executed on the session's LUN map, the session placed in the session table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use iscsi_net::{PduReader, PduWriter};
use iscsi_proto::keys::SessionType;
use iscsi_proto::target::{Command, Event, TargetConnection, TmfRequest};
use iscsi_wire::{Status, TmfFunction, TmfResponse};
use scsi::{ItNexus, LunMap};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::server::Shared;
use crate::sessions::Placement;

/// Flush the output once this much is queued, even if more input is waiting.
const FLUSH_THRESHOLD: usize = 512 * 1024;

/// The session this connection carries, once login placed it.
struct Session {
    placement: Placement,
    nexus: ItNexus,
    luns: Option<Arc<LunMap>>,
}

pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let (rd, wr) = stream.into_split();
    let mut reader = PduReader::new(rd);
    let mut writer = PduWriter::new(wr);
    let mut conn = TargetConnection::new(shared.portal.clone());
    let mut session: Option<Session> = None;
    let never = Arc::new(Notify::new());
    let mut end_reason = String::from("connection closed by the initiator");

    'outer: loop {
        let deadline = conn.poll_timeout();
        let ended = session
            .as_ref()
            .map_or(never.clone(), |s| s.placement.end.clone());
        tokio::select! {
            item = reader.next() => match item {
                Ok(Some(pdu)) => {
                    let now = Instant::now();
                    conn.handle_pdu(pdu, now);
                    if !drive(&mut conn, &mut reader, &mut writer, &shared, &mut session, &mut end_reason) {
                        break 'outer;
                    }
                    // Work through whatever else already arrived before writing.
                    loop {
                        if writer.queued() >= FLUSH_THRESHOLD {
                            break;
                        }
                        match reader.try_next() {
                            Ok(Some(pdu)) => {
                                conn.handle_pdu(pdu, now);
                                if !drive(&mut conn, &mut reader, &mut writer, &shared, &mut session, &mut end_reason) {
                                    break 'outer;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                end_reason = format!("framing lost: {e}");
                                break 'outer;
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    end_reason = format!("read failed: {e}");
                    break;
                }
            },
            _ = sleep_until(deadline) => {
                conn.handle_timeout(Instant::now());
                if !drive(&mut conn, &mut reader, &mut writer, &shared, &mut session, &mut end_reason) {
                    break;
                }
            }
            _ = ended.notified() => {
                end_reason = "reinstated by a new login of the same initiator port".into();
                break;
            }
            _ = stop.changed() => {
                end_reason = "target shutting down".into();
                break;
            }
        }
        if let Err(e) = writer.flush().await {
            end_reason = format!("write failed: {e}");
            break;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
    if let Some(s) = session {
        let current = shared
            .sessions
            .lock()
            .map(|mut t| t.remove(&s.placement.key, s.placement.generation))
            .unwrap_or(false);
        // A reinstated session's nexus lives on in its successor: no nexus loss to report.
        if current {
            if let Some(luns) = &s.luns {
                for lun in luns.luns() {
                    if let Some(lu) = luns.get(lun) {
                        lu.nexus_lost(&s.nexus);
                    }
                }
            }
        }
        tracing::info!(%peer, initiator = %s.nexus.initiator_port, tsih = s.placement.tsih, reason = %end_reason, "session ended");
    } else {
        tracing::info!(%peer, reason = %end_reason, "connection ended before login completed");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Moves queued PDUs to the writer and carries out events. False when the connection must end.
fn drive(
    conn: &mut TargetConnection,
    reader: &mut PduReader<tokio::net::tcp::OwnedReadHalf>,
    writer: &mut PduWriter<tokio::net::tcp::OwnedWriteHalf>,
    shared: &Shared,
    session: &mut Option<Session>,
    end_reason: &mut String,
) -> bool {
    loop {
        queue_transmits(conn, writer);
        let Some(event) = conn.poll_event() else {
            return true;
        };
        match event {
            Event::SessionRequested(req) => {
                let placed = shared
                    .sessions
                    .lock()
                    .map_err(|_| iscsi_wire::LoginStatus::TARGET_ERROR)
                    .and_then(|mut t| t.place(&req));
                match placed {
                    Ok(placement) => {
                        let target = req.target_name.clone().unwrap_or_default();
                        let nexus = ItNexus {
                            initiator_port: format!(
                                "{},i,0x{:012x}",
                                req.initiator_name, req.isid.0
                            ),
                            target_port: format!("{},t,0x{:04x}", target, shared.portal_group_tag),
                            relative_target_port: shared.portal_group_tag,
                        };
                        let luns = match req.session_type {
                            SessionType::Normal => shared.luns_of(&target),
                            SessionType::Discovery => None,
                        };
                        tracing::info!(
                            initiator = %req.initiator_name, isid = %req.isid, target = %target,
                            tsih = placement.tsih, reinstatement = placement.reinstated_older,
                            kind = ?req.session_type, "login complete"
                        );
                        conn.accept_session(placement.tsih);
                        *session = Some(Session {
                            placement,
                            nexus,
                            luns,
                        });
                    }
                    Err(status) => conn.refuse_session(status),
                }
            }
            Event::FullFeature { rx, tx, .. } => {
                reader.set_limits(rx);
                writer.set_limits(tx);
            }
            Event::Execute(cmd) => execute(conn, session.as_ref(), cmd),
            Event::TaskManagement(tmf) => {
                let cold = tmf.function == TmfFunction::TARGET_COLD_RESET;
                task_management(conn, session.as_ref(), tmf);
                if cold {
                    // RFC 7143 §11.5.1: a cold reset ends every session of the target.
                    if let Ok(table) = shared.sessions.lock() {
                        table.end_all();
                    }
                    *end_reason = "target cold reset".into();
                    queue_transmits(conn, writer);
                    return false;
                }
            }
            Event::Close { reason } => {
                *end_reason = reason;
                queue_transmits(conn, writer);
                return false;
            }
        }
    }
}

/// Moves every PDU the connection has ready into the writer's batch.
fn queue_transmits(
    conn: &mut TargetConnection,
    writer: &mut PduWriter<tokio::net::tcp::OwnedWriteHalf>,
) {
    while let Some(out) = conn.poll_transmit() {
        writer.queue(&out.bhs, &out.ahs, out.data);
    }
}

fn execute(conn: &mut TargetConnection, session: Option<&Session>, cmd: Command) {
    let Some((luns, nexus)) = session.and_then(|s| Some((s.luns.as_ref()?, &s.nexus))) else {
        // SCSI commands in a discovery session: refuse them as the RFC's Reject would.
        let sense = scsi::Sense::illegal(scsi::AscAscq::LOGICAL_UNIT_NOT_SUPPORTED).encode_fixed();
        conn.complete(cmd.itt, Status::CHECK_CONDITION, &sense, Bytes::new(), None);
        return;
    };
    let lun = scsi::lun::decode(cmd.raw_lun);
    let write_len = if cmd.write {
        luns.get(lun)
            .and_then(|lu| lu.expected_data_out_len(&cmd.cdb))
            .map(|n| n.min(u32::MAX as usize) as u32)
    } else {
        None
    };
    let resp = luns.execute(nexus, lun, &cmd.cdb, &cmd.data_out);
    conn.complete(
        cmd.itt,
        Status(resp.status.0),
        &resp.sense,
        Bytes::from(resp.data),
        write_len,
    );
}

fn task_management(conn: &mut TargetConnection, session: Option<&Session>, tmf: TmfRequest) {
    let Some((luns, nexus)) = session.and_then(|s| Some((s.luns.as_ref()?, &s.nexus))) else {
        conn.tmf_done(tmf.itt, TmfResponse::FUNCTION_REJECTED);
        return;
    };
    let response = match tmf.function {
        TmfFunction::LOGICAL_UNIT_RESET => match luns.get(scsi::lun::decode(tmf.raw_lun)) {
            Some(lu) => {
                lu.logical_unit_reset(nexus);
                TmfResponse::FUNCTION_COMPLETE
            }
            None => TmfResponse::LUN_DOES_NOT_EXIST,
        },
        _ => {
            for lun in luns.luns() {
                if let Some(lu) = luns.get(lun) {
                    lu.target_reset(nexus);
                }
            }
            TmfResponse::FUNCTION_COMPLETE
        }
    };
    conn.tmf_done(tmf.itt, response);
}

//! `viscsi inquiry URL [--page P]`: standard INQUIRY data, or one VPD page — decoded for the
//! supported-pages list (0x00), the unit serial number (0x80) and device identification
//! (0x83), hex-dumped otherwise.

use bytes::Bytes;
use clap::Args;
use initiator::url::IscsiUrl;
use initiator::Session;

use super::{close, describe_error, ConnectArgs, Connection};

/// `viscsi inquiry` flags.
#[derive(Args)]
pub struct InquiryArgs {
    /// iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN
    #[arg(value_name = "URL")]
    url: String,
    /// A VPD page instead of the standard data: 0x80, 80h or 128 (hex needs 0x or h).
    #[arg(long, value_name = "PAGE", value_parser = parse_page)]
    page: Option<u8>,
    #[command(flatten)]
    connect: ConnectArgs,
}

fn parse_page(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let parsed = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u8::from_str_radix(hex, 16)
    } else if let Some(hex) = t.strip_suffix(['h', 'H']) {
        u8::from_str_radix(hex, 16)
    } else {
        t.parse()
    };
    parsed.map_err(|_| "expected a page code from 0 to 255, e.g. 0x83".to_owned())
}

pub struct InquiryConfig {
    connection: Connection,
    url: IscsiUrl,
    lun: u64,
    page: Option<u8>,
}

impl TryFrom<InquiryArgs> for InquiryConfig {
    type Error = String;
    fn try_from(a: InquiryArgs) -> Result<Self, String> {
        let connection = Connection::try_from(a.connect)?;
        let url = connection.url(&a.url)?;
        let (_, lun) = url.require_lun().map_err(|e| e.to_string())?;
        Ok(InquiryConfig {
            connection,
            url,
            lun,
            page: a.page,
        })
    }
}

pub async fn run(config: InquiryConfig) -> Result<(), String> {
    let session = config.connection.connect(&config.url).await?;
    let result = match config.page {
        None => standard(&session, config.lun).await,
        Some(page) => vpd(&session, config.lun, page).await,
    };
    close(&session).await;
    let text = result?;
    print!("{text}");
    Ok(())
}

/// SPC-4 peripheral device type names.
pub fn device_type_name(code: u8) -> &'static str {
    match code {
        0x00 => "disk",
        0x01 => "tape",
        0x02 => "printer",
        0x03 => "processor",
        0x04 => "write-once",
        0x05 => "cd/dvd",
        0x07 => "optical memory",
        0x08 => "media changer",
        0x0c => "storage array controller",
        0x0d => "enclosure services",
        0x0e => "simplified direct-access",
        0x0f => "optical card reader",
        0x11 => "object storage",
        0x12 => "automation/drive interface",
        0x1e => "well known LU",
        0x1f => "unknown or no device",
        _ => "reserved type",
    }
}

/// Device types that answer READ CAPACITY.
pub fn has_capacity(code: u8) -> bool {
    matches!(code, 0x00 | 0x04 | 0x05 | 0x07 | 0x0e)
}

fn version_name(v: u8) -> &'static str {
    match v {
        0 => "no standard claimed",
        3 => "SPC",
        4 => "SPC-2",
        5 => "SPC-3",
        6 => "SPC-4",
        7 => "SPC-5",
        _ => "unknown",
    }
}

/// Printable ASCII of a fixed-width field; NULs (unset fields) count as spaces.
fn ascii(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c == 0 {
                ' '
            } else if c.is_ascii_graphic() || c == b' ' {
                char::from(c)
            } else {
                '.'
            }
        })
        .collect::<String>()
        .trim()
        .to_owned()
}

fn yes_no(bit: bool) -> &'static str {
    if bit {
        "yes"
    } else {
        "no"
    }
}

async fn standard(session: &Session, lun: u64) -> Result<String, String> {
    let c = session
        .command(lun, &[0x12, 0, 0, 0, 255, 0], Bytes::new(), 255)
        .await
        .map_err(|e| format!("INQUIRY: {}", describe_error(&e)))?;
    decode_standard(&c.data.into_bytes())
}

/// The standard INQUIRY fields, one per line.
fn decode_standard(d: &[u8]) -> Result<String, String> {
    if d.len() < 36 {
        return Err(format!(
            "INQUIRY: the target sent {} bytes, fewer than the 36 of standard data",
            d.len()
        ));
    }
    let qualifier = d[0] >> 5;
    let device_type = d[0] & 0x1f;
    let tpgs = (d[5] >> 4) & 3;
    let rows = [
        (
            "Peripheral qualifier",
            format!(
                "{qualifier} ({})",
                match qualifier {
                    0 => "connected",
                    1 => "not connected",
                    3 => "no device at this LUN",
                    _ => "reserved",
                }
            ),
        ),
        (
            "Device type",
            format!("0x{device_type:02x} ({})", device_type_name(device_type)),
        ),
        ("Removable", yes_no(d[1] & 0x80 != 0).into()),
        (
            "Version",
            format!("0x{:02x} ({})", d[2], version_name(d[2])),
        ),
        ("Response data format", (d[3] & 0x0f).to_string()),
        ("HiSup", yes_no(d[3] & 0x10 != 0).into()),
        ("Additional length", d[4].to_string()),
        (
            "TPGS",
            match tpgs {
                0 => "not supported".into(),
                1 => "implicit".into(),
                2 => "explicit".into(),
                _ => "implicit and explicit".to_string(),
            },
        ),
        ("3PC (third-party copy)", yes_no(d[5] & 0x08 != 0).into()),
        ("Protect", yes_no(d[5] & 0x01 != 0).into()),
        ("CmdQue", yes_no(d[7] & 0x02 != 0).into()),
        ("Vendor", ascii(&d[8..16])),
        ("Product", ascii(&d[16..32])),
        ("Revision", ascii(&d[32..36])),
    ];
    Ok(rows.iter().map(|(k, v)| format!("{k:<23} {v}\n")).collect())
}

async fn vpd(session: &Session, lun: u64, page: u8) -> Result<String, String> {
    let data = session
        .vpd_page(lun, page)
        .await
        .map_err(|e| format!("VPD page 0x{page:02x}: {}", describe_error(&e)))?;
    Ok(decode_vpd(page, &data))
}

/// Names of the VPD pages people meet.
fn page_name(page: u8) -> &'static str {
    match page {
        0x00 => "Supported VPD pages",
        0x80 => "Unit serial number",
        0x83 => "Device identification",
        0x86 => "Extended INQUIRY data",
        0x87 => "Mode page policy",
        0x88 => "SCSI ports",
        0x89 => "ATA information",
        0x8f => "Third-party copy",
        0xb0 => "Block limits",
        0xb1 => "Block device characteristics",
        0xb2 => "Logical block provisioning",
        0xb3 => "Referrals",
        _ => "",
    }
}

/// A VPD page (header included) as text.
fn decode_vpd(page: u8, data: &[u8]) -> String {
    let declared = data
        .get(2..4)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let body = &data[4.min(data.len())..(4 + declared).min(data.len())];
    let mut out = format!("VPD page 0x{page:02x}");
    let name = page_name(page);
    if !name.is_empty() {
        out.push_str(&format!(" ({name})"));
    }
    out.push_str(&format!(", {} bytes\n", body.len()));
    match page {
        0x00 => {
            for &p in body {
                let name = page_name(p);
                out.push_str(&format!("  0x{p:02x}  {name}\n"));
            }
        }
        0x80 => out.push_str(&format!("  Serial number: {}\n", ascii(body))),
        0x83 => out.push_str(&decode_designators(body)),
        _ => out.push_str(&hex_dump(data)),
    }
    out
}

/// The designation descriptors of page 0x83 (SPC-4 7.8.6).
fn decode_designators(mut body: &[u8]) -> String {
    let mut out = String::new();
    while body.len() >= 4 {
        let code_set = body[0] & 0x0f;
        let protocol = body[0] >> 4;
        let piv = body[1] & 0x80 != 0;
        let association = (body[1] >> 4) & 3;
        let kind = body[1] & 0x0f;
        let len = usize::from(body[3]);
        let Some(value) = body.get(4..4 + len) else {
            out.push_str("  (truncated descriptor)\n");
            break;
        };
        let kind_name = match kind {
            0 => "vendor specific",
            1 => "T10 vendor ID",
            2 => "EUI-64",
            3 => "NAA",
            4 => "relative target port",
            5 => "target port group",
            6 => "logical unit group",
            7 => "MD5 logical unit ID",
            8 => "SCSI name string",
            9 => "protocol specific port ID",
            10 => "UUID",
            _ => "reserved",
        };
        let association_name = match association {
            0 => "logical unit",
            1 => "target port",
            2 => "target device",
            _ => "reserved",
        };
        let shown = match (kind, code_set) {
            (4..=6, _) if value.len() >= 4 => u16::from_be_bytes([value[2], value[3]]).to_string(),
            (_, 2 | 3) => ascii(value.split(|&b| b == 0).next().unwrap_or_default()),
            _ => format!(
                "0x{}",
                value.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
        };
        let protocol_note = if piv && protocol == 5 { ", iSCSI" } else { "" };
        out.push_str(&format!(
            "  {kind_name} ({association_name}{protocol_note}): {shown}\n"
        ));
        body = &body[4 + len..];
    }
    out
}

/// Offset, 16 bytes of hex, and their printable characters per line.
fn hex_dump(data: &[u8]) -> String {
    let mut out = String::new();
    for (i, row) in data.chunks(16).enumerate() {
        let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = row
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "  {:04x}  {:<47}  {text}\n",
            i * 16,
            hex.join(" ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_flag() {
        assert_eq!(parse_page("0x83").unwrap(), 0x83);
        assert_eq!(parse_page("b0h").unwrap(), 0xb0);
        assert_eq!(parse_page("128").unwrap(), 0x80);
        assert!(parse_page("256").is_err());
        assert!(parse_page("0xzz").is_err());
    }

    #[test]
    fn standard_data() {
        let mut d = vec![0u8; 36];
        d[2] = 6;
        d[3] = 0x12;
        d[7] = 0x02;
        d[8..16].copy_from_slice(b"VISCSI  ");
        d[16..32].copy_from_slice(b"MEMDISK         ");
        d[32..36].copy_from_slice(b"0001");
        let text = decode_standard(&d).unwrap();
        assert!(
            text.contains("Device type             0x00 (disk)"),
            "{text}"
        );
        assert!(
            text.contains("Version                 0x06 (SPC-4)"),
            "{text}"
        );
        assert!(text.contains("Vendor                  VISCSI\n"), "{text}");
        assert!(text.contains("CmdQue                  yes"), "{text}");
        assert!(decode_standard(&d[..20]).is_err());
    }

    #[test]
    fn vpd_pages() {
        let text = decode_vpd(0x00, &[0, 0, 0, 3, 0x00, 0x80, 0x83]);
        assert!(text.contains("0x80  Unit serial number"), "{text}");
        let text = decode_vpd(0x80, &[0, 0x80, 0, 4, b'a', b'b', b'c', b' ']);
        assert!(text.contains("Serial number: abc"), "{text}");
        let mut di = vec![0, 0x83, 0, 0];
        // NAA, binary, LU.
        di.extend_from_slice(&[0x01, 0x03, 0, 8, 0x60, 1, 2, 3, 4, 5, 6, 7]);
        // SCSI name string, UTF-8, target device, iSCSI.
        di.extend_from_slice(&[0x53, 0xa8, 0, 8]);
        di.extend_from_slice(b"iqn.a:b\0");
        // Relative target port 1.
        di.extend_from_slice(&[0x51, 0x94, 0, 4, 0, 0, 0, 1]);
        di[3] = (di.len() - 4) as u8;
        let text = decode_vpd(0x83, &di);
        assert!(
            text.contains("NAA (logical unit): 0x6001020304050607"),
            "{text}"
        );
        assert!(
            text.contains("SCSI name string (target device, iSCSI): iqn.a:b"),
            "{text}"
        );
        assert!(
            text.contains("relative target port (target port, iSCSI): 1"),
            "{text}"
        );
        // A descriptor longer than the page: no panic.
        let text = decode_vpd(0x83, &[0, 0x83, 0, 6, 1, 3, 0, 200, 1, 2]);
        assert!(text.contains("truncated"), "{text}");
        let text = decode_vpd(0xb0, &[0, 0xb0, 0, 2, 0x41, 0x42]);
        assert!(text.contains("0000  00 b0 00 02 41 42"), "{text}");
        assert!(text.contains("Block limits"), "{text}");
        // Page length beyond the data: no panic.
        assert!(decode_vpd(0x80, &[0, 0x80, 0xff, 0xff]).contains("0 bytes"));
    }
}

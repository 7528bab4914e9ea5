//! Static network configuration through netlink: loopback up, then each
//! configured interface gets its addresses, link up, a default route and
//! `/etc/resolv.conf`. DHCP and link monitoring come with the runtime work.

use std::net::IpAddr;
use std::time::Duration;

use futures_util::TryStreamExt;

use crate::config::{parse_cidr, NetworkConfig};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("interface {name}: {what}")]
    Netlink {
        name: String,
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} did not appear")]
    NoInterface(String),
    #[error("writing /etc/resolv.conf")]
    Resolv(#[source] std::io::Error),
}

/// Brings up `lo` and every configured interface.
pub async fn configure(config: &NetworkConfig) -> Result<(), NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let task = tokio::spawn(connection);
    let result = configure_with(&handle, config).await;
    task.abort();
    result
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: not there (yet).
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
        Err(source) => Err(NetError::Netlink {
            name: name.to_owned(),
            what: "looking up",
            source,
        }),
    }
}

async fn configure_with(
    handle: &rtnetlink::Handle,
    config: &NetworkConfig,
) -> Result<(), NetError> {
    let nl = |name: &str, what: &'static str| {
        let name = name.to_owned();
        move |source| NetError::Netlink { name, what, source }
    };
    if let Some(lo) = link_index(handle, "lo").await? {
        handle
            .link()
            .set(lo)
            .up()
            .execute()
            .await
            .map_err(nl("lo", "bringing up"))?;
    }
    let mut dns = Vec::new();
    for (name, iface) in &config.interfaces {
        // NIC drivers bind asynchronously after their module loads.
        let mut index = None;
        for _ in 0..100 {
            index = link_index(handle, name).await?;
            if index.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let index = index.ok_or_else(|| NetError::NoInterface(name.clone()))?;
        for a in &iface.addresses {
            let Some(cidr) = parse_cidr(a) else { continue };
            match handle
                .address()
                .add(index, cidr.addr, cidr.prefix)
                .execute()
                .await
            {
                Ok(()) => {}
                // EEXIST: kept from an earlier configuration.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => {}
                Err(source) => {
                    return Err(NetError::Netlink {
                        name: name.clone(),
                        what: "adding an address",
                        source,
                    })
                }
            }
        }
        handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(nl(name, "bringing up"))?;
        match iface.gateway {
            Some(IpAddr::V4(gw)) => {
                handle
                    .route()
                    .add()
                    .v4()
                    .gateway(gw)
                    .output_interface(index)
                    .execute()
                    .await
                    .map_err(nl(name, "adding the default route"))?;
            }
            Some(IpAddr::V6(gw)) => {
                handle
                    .route()
                    .add()
                    .v6()
                    .gateway(gw)
                    .output_interface(index)
                    .execute()
                    .await
                    .map_err(nl(name, "adding the default route"))?;
            }
            None => {}
        }
        dns.extend(iface.dns.iter().copied());
        tracing::info!(interface = %name, addresses = ?iface.addresses, "interface configured");
    }
    if !dns.is_empty() {
        let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        std::fs::write("/etc/resolv.conf", text).map_err(NetError::Resolv)?;
    }
    Ok(())
}

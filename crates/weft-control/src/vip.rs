//! Services' virtual IPs: allocated, stored, never shared.
//!
//! Each service gets an address from 240.240.0.0/16 ([`weft_api::mesh::VIRTUAL_IPS`]) the first
//! time a plan needs it, claimed in the store in one transaction ([`Store::claim_vip`]) so
//! that no two services ever hold one address, on one replica or several, and the address
//! outlives restarts. Nothing releases an address yet: services are never deleted, so an
//! address is never reused while its service exists.
//!
//! The first address tried is the one derived from the service's name
//! ([`weft_api::mesh::virtual_ip`], what earlier releases handed out), so a service keeps the
//! address its callers may have cached; when another service holds it, the next free one.

use crate::store::{Claim, Store, StoreError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// 240.240.0.1 ..= 240.240.255.254.
const USABLE: u32 = 65_534;
const FIRST: u32 = 0xF0F0_0001;

/// This replica's copy of the allocations, filled from the store at start and by its claims.
pub(crate) struct Vips {
    store: Arc<Store>,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    by_service: HashMap<String, Ipv4Addr>,
    by_address: HashMap<Ipv4Addr, String>,
}

impl Held {
    fn insert(&mut self, service: String, ip: Ipv4Addr) {
        self.by_address.insert(ip, service.clone());
        self.by_service.insert(service, ip);
    }
}

impl Vips {
    pub(crate) fn load(store: Arc<Store>) -> Result<Self, StoreError> {
        let vips = Self {
            store,
            held: Mutex::default(),
        };
        vips.reload()?;
        Ok(vips)
    }

    /// Every allocation in the store, other replicas' too.
    fn reload(&self) -> Result<(), StoreError> {
        let all = self.store.vips()?;
        let mut held = self.held.lock();
        for (service, ip) in all {
            held.insert(service, ip);
        }
        Ok(())
    }

    /// The service (`NAMESPACE/NAME`) holding `ip`, looked up in the store too when this
    /// replica has not seen the allocation.
    pub(crate) fn service_at(&self, ip: Ipv4Addr) -> Option<String> {
        if let Some(service) = self.held.lock().by_address.get(&ip) {
            return Some(service.clone());
        }
        if let Err(error) = self.reload() {
            tracing::warn!(%ip, %error, "cannot read the virtual IPs");
        }
        self.held.lock().by_address.get(&ip).cloned()
    }

    /// The virtual IP of `namespace/name`, claimed now if it has none. `None` only when the
    /// store cannot be written or the range is full (logged; the next plan tries again).
    pub(crate) fn virtual_ip(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        let service = format!("{namespace}/{name}");
        if let Some(ip) = self.held.lock().by_service.get(&service) {
            return Some(*ip);
        }
        match self.allocate(&service, weft_api::mesh::virtual_ip(namespace, name)) {
            Ok(ip) => ip,
            Err(error) => {
                tracing::warn!(%service, %error, "no virtual IP allocated");
                None
            }
        }
    }

    /// Claims `preferred`, else the next address up (wrapping) not known to be taken. The
    /// store's lock is not held across claims: two callers for one service both end with the
    /// one address the store gave it.
    fn allocate(&self, service: &str, preferred: Ipv4Addr) -> Result<Option<Ipv4Addr>, StoreError> {
        let start = u32::from(preferred).wrapping_sub(FIRST) % USABLE;
        for step in 0..USABLE {
            let ip = Ipv4Addr::from(FIRST + (start + step) % USABLE);
            if self.held.lock().by_address.contains_key(&ip) {
                continue;
            }
            match self.store.claim_vip(service, ip)? {
                Claim::Claimed => {
                    tracing::info!(%service, %ip, "virtual IP allocated");
                    self.held.lock().insert(service.to_string(), ip);
                    return Ok(Some(ip));
                }
                Claim::Held(held) => {
                    self.held.lock().insert(service.to_string(), held);
                    return Ok(Some(held));
                }
                // Another replica's claim this one has not loaded.
                Claim::Taken => self.reload()?,
            }
        }
        tracing::warn!(%service, "every virtual IP in 240.240.0.0/16 is taken");
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::on_etcd::tests::OneEtcd;
    use std::collections::HashSet;

    /// 1,000 services (past the ~300 where hashed addresses collide half the time): no two
    /// share an address, every one is in range, and a new process on the same store (a
    /// restart) hands each service the address it had.
    fn a_thousand_services_never_share_an_address(open: impl Fn() -> Store) {
        let first = Vips::load(Arc::new(open())).unwrap();
        let names: Vec<String> = (0..1000).map(|i| format!("svc-{i}")).collect();
        let given: Vec<Ipv4Addr> = names.iter().map(|n| first.virtual_ip("default", n).unwrap()).collect();
        let distinct: HashSet<&Ipv4Addr> = given.iter().collect();
        assert_eq!(distinct.len(), 1000, "no address given twice");
        assert!(
            given.iter().all(|ip| (FIRST..FIRST + USABLE).contains(&u32::from(*ip))),
            "every address in 240.240.0.1 ..= 240.240.255.254"
        );
        let hashed: HashSet<Ipv4Addr> = names.iter().map(|n| weft_api::mesh::virtual_ip("default", n)).collect();
        eprintln!(
            "MEASURE hashed virtual IPs of 1,000 services: {} distinct (allocated: 1,000)",
            hashed.len()
        );
        assert!(hashed.len() < 1000, "the names collide when hashed, so allocation had work to do");
        drop(first);
        let restarted = Vips::load(Arc::new(open())).unwrap();
        for (name, ip) in names.iter().zip(&given) {
            assert_eq!(restarted.virtual_ip("default", name), Some(*ip), "{name} kept its address");
        }
    }

    #[test]
    fn allocated_addresses_are_unique_and_survive_a_restart_on_redb() {
        let dir = std::env::temp_dir().join(format!("weft-vips-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        a_thousand_services_never_share_an_address(|| Store::open(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn allocated_addresses_are_unique_and_survive_a_restart_on_etcd() {
        let etcd = OneEtcd::start();
        a_thousand_services_never_share_an_address(|| Store::Etcd(etcd.store("/vips")));
        // Two replicas, both without the service in their copies: the first claim wins and
        // the second is given the same address, not one of its own.
        let a = Vips::load(Arc::new(Store::Etcd(etcd.store("/race")))).unwrap();
        let b = Vips::load(Arc::new(Store::Etcd(etcd.store("/race")))).unwrap();
        let ip = a.virtual_ip("default", "orders-api").unwrap();
        assert_eq!(b.virtual_ip("default", "orders-api"), Some(ip));
        assert_ne!(b.virtual_ip("default", "payments-svc"), Some(ip));
        assert_eq!(
            a.service_at(b.virtual_ip("default", "payments-svc").unwrap()).as_deref(),
            Some("default/payments-svc"),
            "an address another replica gave is found in the store"
        );
        assert_eq!(a.service_at("240.240.0.0".parse().unwrap()), None);
    }
}

//! shoal: a distributed, unikernel-style hypervisor.
//!
//! This crate is the VMM of one node: guest memory ([`memory`]), the page
//! engine that resolves the guest's faults, alone or in a pod ([`pod`]),
//! the image loader ([`loader`]), vCPUs ([`vcpu`]), port-I/O devices
//! ([`devices`]), virtio devices over MMIO ([`virtio`]), and [`vm`], which
//! wires them into a running VM. `docs/ARCHITECTURE.md`
//! tells how a guest page fault flows through them.

pub mod acpi;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod mptable;
pub mod pod;
pub mod uffd;
pub mod vcpu;
pub mod vcpus;
pub mod virtio;
pub mod vm;

//! A userspace service proxy and cluster DNS over a TUN device with smoltcp. Not built yet:
//! see the open issue "netd: services without iptables".

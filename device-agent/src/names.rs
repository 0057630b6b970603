//! Metric names: turning interface names, mount points, sensor labels and JSON keys into
//! names the protocol accepts (`[A-Za-z0-9_.:/-]{1,64}`, see
//! [`schemas::limits::is_valid_name`]).

use schemas::limits::{is_valid_name, MAX_METRIC_LEN};

/// Replaces every character outside `[A-Za-z0-9_-]` with `_`, folds runs of `_`, and trims
/// `_` at both ends. Dots and slashes are replaced too, so that one label stays one
/// component of a dotted metric name (`/var/lib` becomes `var_lib`). Returns `"_"` for
/// text that has nothing usable left.
pub fn sanitize_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let keep = c.is_ascii_alphanumeric() || c == '-' || c == '_';
        let c = if keep { c } else { '_' };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    let trimmed = out.trim_matches('_');
    if trimmed.is_empty() {
        "_".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The label used for a mount point in disk metric names: `root` for `/`, otherwise the
/// sanitized path (`/var/lib/docker` becomes `var_lib_docker`).
pub fn mount_label(mount: &str) -> String {
    if mount.trim_matches('/').is_empty() {
        "root".to_string()
    } else {
        sanitize_component(mount)
    }
}

/// Joins name parts with `.`, cutting the result to the protocol's 64 bytes. Parts are
/// expected to be valid already (sanitized); the result is checked and `None` is returned
/// when it is still not a valid metric name.
pub fn metric(parts: &[&str]) -> Option<String> {
    let mut name = parts.join(".");
    if name.len() > MAX_METRIC_LEN {
        // Keep the end: it says what the value is (`.used_bytes`), which matters more
        // than the middle of a long mount path. Cut at a char boundary (ASCII anyway).
        let mut start = name.len() - MAX_METRIC_LEN;
        while !name.is_char_boundary(start) {
            start += 1;
        }
        name = name[start..].trim_start_matches(['.', '_']).to_string();
    }
    is_valid_name(&name, MAX_METRIC_LEN).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_sanitized() {
        assert_eq!(sanitize_component("eth0"), "eth0");
        assert_eq!(sanitize_component("wlp2s0 (wifi)"), "wlp2s0_wifi");
        assert_eq!(sanitize_component("acpitz temp1"), "acpitz_temp1");
        assert_eq!(sanitize_component("br.lan/0"), "br_lan_0");
        assert_eq!(sanitize_component("ü"), "_");
        assert_eq!(mount_label("/"), "root");
        assert_eq!(mount_label("/var/lib/docker"), "var_lib_docker");
        assert_eq!(mount_label("/boot/firmware/"), "boot_firmware");
    }

    #[test]
    fn metric_names_are_valid_and_bounded() {
        assert_eq!(
            metric(&["disk", "root", "used_bytes"]).as_deref(),
            Some("disk.root.used_bytes")
        );
        let long = "x".repeat(100);
        let m = metric(&["disk", &long, "used_bytes"]).expect("valid");
        assert!(m.len() <= MAX_METRIC_LEN);
        assert!(m.ends_with(".used_bytes"));
        assert_eq!(metric(&["bad name"]), None);
        assert_eq!(metric(&[""]), None);
    }
}

//! `sluice workflow check`: the shipped definitions pass; a wrong one is refused with its file,
//! line and field, and the command fails.

use crate::harness::{sluice, unique};

#[test]
fn workflow_check_passes_the_shipped_definitions_and_names_each_mistake() {
    let prefix = unique("t");
    let shipped = sluice(&prefix)
        .args(["workflow", "check"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&shipped.stdout);
    assert!(shipped.status.success(), "{out}");
    for name in ["create_order", "customer_support", "track_order"] {
        assert!(out.contains(&format!("ok workflows/{name}.yaml")), "{out}");
    }

    let folder = std::env::temp_dir().join(unique("workflows-"));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("refund.yaml"),
        "name: refund\nversion: 1\ndescription: d\nsteps:\n  - id: a\n    tool: refund\n",
    )
    .unwrap();
    let checked = sluice(&prefix)
        .args(["workflow", "check"])
        .arg(&folder)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(!checked.status.success());
    let expected = format!(
        "{}:6:11: steps[0].tool: no tool named \"refund\"",
        folder.join("refund.yaml").display()
    );
    assert!(out.contains(&expected), "{out}");
    let _ = std::fs::remove_dir_all(folder);
}

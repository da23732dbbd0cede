//! What the database holds outside the books (`set_outside_bytes`, the
//! agent's `outside`) takes room from reservations, but never an engine's
//! floor.

use nodedb_governor::{Budget, EngineId, MemError, MemoryGovernor};

const MIB: u64 = 1 << 20;

#[test]
fn memory_outside_the_books_takes_room_but_never_a_floor() {
    let governor = MemoryGovernor::new(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 20 * MIB, 80 * MIB)
            .engine(EngineId::Query, 0, 80 * MIB)
            .build()
            .unwrap(),
    );
    governor.set_outside_bytes(95 * MIB);
    assert_eq!(governor.outside_bytes(), 95 * MIB);
    // Query: 100 - 95, less Vector's unused floor (20): nothing.
    assert!(matches!(
        governor.try_reserve(EngineId::Query, MIB),
        Err(MemError::GlobalCeilingExceeded { .. })
    ));
    // Vector: its floor, whatever is held outside, and not a byte more.
    let floor = governor.try_reserve(EngineId::Vector, 20 * MIB).unwrap();
    assert!(governor.try_reserve(EngineId::Vector, MIB).is_err());
    drop(floor);
    // Less outside, more room: 100 - 30 - 20 (Vector's floor, unused).
    governor.set_outside_bytes(30 * MIB);
    let q = governor.try_reserve(EngineId::Query, 50 * MIB).unwrap();
    assert!(governor.try_reserve(EngineId::Query, MIB).is_err());
    drop(q);
    // None: the books alone.
    governor.set_outside_bytes(0);
    assert!(governor.try_reserve(EngineId::Query, 80 * MIB).is_ok());
}

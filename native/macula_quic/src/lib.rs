//! macula_quic: Quinn bound to the BEAM through Rustler.
rustler::atoms! { ok }

#[rustler::nif]
fn ping() -> rustler::Atom {
    ok()
}

rustler::init!("Elixir.MaculaQuic.Native");

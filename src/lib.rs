//! vetassist_auth: logins of a veterans' health application kept safe inside PostgreSQL.
//!
//! The modules are layers that only point down (docs/ARCHITECTURE.md, "Layers";
//! `scripts/layers.py` checks it); the SQL of each capability is a file of `sql/`.

use pgrx::prelude::*;

mod audit;
mod bytea;
mod citus;
mod connections;
mod counters;
mod crypto;
mod encryption;
mod error;
mod gucs;
mod identity;
mod key_jobs;
mod keys;
mod log_redaction;
mod metrics;
mod mfa;
mod outbox;
mod pg;
mod protected_columns;
mod replica;
mod sealing;
mod search_path;
mod session_settings;
mod shmem;
mod signals;
mod sweeper;

#[cfg(feature = "pg_test")]
mod pg_tests;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
// Functions in plpgsql only (resolved when they run); first, because key_usage names one.
extension_sql_file!("../sql/citus.sql", name = "citus", requires = ["schema"]);
extension_sql_file!(
    "../sql/keys.sql",
    name = "keys_sql",
    requires = [
        "schema",
        "citus",
        encryption::encrypt_for_application,
        encryption::decrypt,
        encryption::encrypt_token,
        encryption::decrypt_token,
        encryption::field_hash,
        encryption::envelope_key_id,
        encryption::hash_key_id,
        encryption::opens,
        encryption::open_phi,
        encryption::open_phi_text,
        encryption::seal_phi_text,
        encryption::encrypt_mfa_secret,
        encryption::open_mfa_secret,
        protected_columns::protected_columns,
        protected_columns::reseal,
        protected_columns::rehash,
        keys::admin::active_key_id,
        keys::admin::retire_unused_keys
    ]
);
extension_sql_file!(
    "../sql/audit.sql",
    name = "audit_sql",
    requires = [
        "schema",
        audit::current_actor,
        audit::current_actor_ip_hash,
        audit::current_session_id,
        audit::audit_purge_in_progress,
        audit::row_trigger::row_audit,
        audit::writer::write_audit,
        audit::recorder::write_audit_durably,
        audit::recorder::durable_audit_state,
        citus::on_citus_worker
    ]
);
extension_sql_file!(
    "../sql/identity.sql",
    name = "identity_sql",
    requires = ["keys_sql", "audit_sql", identity::claim_new_account]
);
extension_sql_file!(
    "../sql/tokens.sql",
    name = "tokens_sql",
    requires = ["identity_sql"]
);
extension_sql_file!(
    "../sql/sessions.sql",
    name = "sessions_sql",
    requires = [
        "identity_sql",
        session_settings::session_idle_timeout,
        session_settings::session_absolute_timeout,
        session_settings::session_idle_warning,
        session_settings::session_touch_interval,
        session_settings::session_retention,
        session_settings::max_sessions_per_user,
        session_settings::refresh_reuse_grace,
        audit::set_request_session,
        audit::clear_actor,
        replica::require_primary_node,
        mfa::mfa_locked_session
    ]
);
extension_sql_file!(
    "../sql/mfa.sql",
    name = "mfa_sql",
    requires = [
        "sessions_sql",
        mfa::totp_new_secret,
        mfa::totp_uri,
        mfa::totp_match,
        mfa::totp_code,
        mfa::mfa_new_backup_code,
        mfa::mfa_normalize_backup_code,
        mfa::mfa_max_failures,
        mfa::mfa_lockout,
        mfa::mfa_failure_times
    ]
);
extension_sql_file!(
    "../sql/accounting.sql",
    name = "accounting_sql",
    requires = [
        "mfa_sql",
        audit::recorder::durable_audit_in_force,
        audit::recorder::write_audit_durably_by_subject
    ]
);
extension_sql_file!(
    "../sql/health.sql",
    name = "health",
    requires = [
        "keys_sql",
        keys::admin::key_purposes,
        keys::admin::master_key_source,
        log_redaction::unredactable_log_channels,
        replica::node_role_state
    ]
);
extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = [
        "keys_sql",
        "audit_sql",
        keys::store::key_creation_in_progress,
        keys::admin::rotate_key,
        replica::node_role,
        replica::require_primary_node
    ]
);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    keys::define_settings();
    replica::define_setting();
    replica::register_callbacks();
    keys::register_callbacks();
    counters::register_callbacks();
    audit::register_callbacks();
    key_jobs::register();
    log_redaction::install();
    // SAFETY: a flag the postmaster sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::request();
        connections::install_hooks();
        outbox::register_reserved();
        sweeper::register();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["vetassist_auth.master_key = '8f2a61c0d94e3b7a5c1e0f9d8b7a6c5e4d3c2b1a09f8e7d6c5b4a39281706f5e'"]
    }
}

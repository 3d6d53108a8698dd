-- The state store schema of canonflow 0.1.0, as that release created it (postgresql):
-- its SqlStateStore's metadata.create_all, before schema migrations existed (no
-- alembic_version table). Tests build a 0.1.0 store from this and upgrade it.

CREATE TABLE active_jobs (
	pipeline VARCHAR(200) NOT NULL, 
	tenant_id VARCHAR(128) NOT NULL, 
	job_id VARCHAR(128) NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (pipeline, tenant_id)
);

CREATE TABLE checkpoints (
	job_id VARCHAR(128) NOT NULL, 
	chunk_id VARCHAR(128) NOT NULL, 
	state TEXT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (job_id, chunk_id)
);

CREATE TABLE chunk_results (
	job_id VARCHAR(128) NOT NULL, 
	chunk_id VARCHAR(128) NOT NULL, 
	completed BOOLEAN NOT NULL, 
	result TEXT NOT NULL, 
	recorded_at FLOAT NOT NULL, 
	PRIMARY KEY (job_id, chunk_id)
);

CREATE TABLE chunks (
	job_id VARCHAR(128) NOT NULL, 
	chunk_id VARCHAR(128) NOT NULL, 
	spec TEXT NOT NULL, 
	PRIMARY KEY (job_id, chunk_id)
);

CREATE TABLE job_events (
	event_id SERIAL NOT NULL, 
	job_id VARCHAR(128) NOT NULL, 
	at FLOAT NOT NULL, 
	kind VARCHAR(40) NOT NULL, 
	chunk_id VARCHAR(128), 
	detail TEXT NOT NULL, 
	PRIMARY KEY (event_id)
);

CREATE INDEX ix_job_events_job_id ON job_events (job_id);

CREATE TABLE jobs (
	job_id VARCHAR(128) NOT NULL, 
	tenant_id VARCHAR(128) NOT NULL, 
	pipeline VARCHAR(200) NOT NULL, 
	trigger_mode VARCHAR(20) NOT NULL, 
	status VARCHAR(24) NOT NULL, 
	outcome VARCHAR(24), 
	total_chunks INTEGER NOT NULL, 
	completed_chunks INTEGER NOT NULL, 
	failed_chunks INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	report TEXT, 
	runner VARCHAR(200), 
	PRIMARY KEY (job_id)
);

CREATE TABLE ledger (
	tenant_id VARCHAR(128) NOT NULL, 
	service_name VARCHAR(128) NOT NULL, 
	table_name VARCHAR(128) NOT NULL, 
	file_key VARCHAR(1024) NOT NULL, 
	request_id VARCHAR(400) NOT NULL, 
	processed_at FLOAT NOT NULL, 
	PRIMARY KEY (tenant_id, service_name, table_name, file_key)
);

CREATE TABLE locks (
	name VARCHAR(400) NOT NULL, 
	holder VARCHAR(200) NOT NULL, 
	expires_at FLOAT NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE outbox (
	request_id VARCHAR(400) NOT NULL, 
	job_id VARCHAR(128), 
	trigger VARCHAR(20) NOT NULL, 
	payload TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	result TEXT, 
	error TEXT, 
	holder VARCHAR(200), 
	PRIMARY KEY (request_id)
);

CREATE INDEX ix_outbox_job_id ON outbox (job_id);

CREATE INDEX ix_outbox_status ON outbox (status);

CREATE TABLE sync_cursors (
	tenant_id VARCHAR(128) NOT NULL, 
	service_name VARCHAR(128) NOT NULL, 
	table_name VARCHAR(128) NOT NULL, 
	value VARCHAR(64) NOT NULL, 
	job_id VARCHAR(128), 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (tenant_id, service_name, table_name)
);

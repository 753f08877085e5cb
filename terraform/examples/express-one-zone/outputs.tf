output "bucket_name" {
  description = "Full directory bucket name (<base>--<az_id>--x-s3)."
  value       = module.s3kv_cache.bucket_name
}

output "bucket_arn" {
  value = module.s3kv_cache.bucket_arn
}

output "engine_policy_arn" {
  value = module.s3kv_cache.engine_policy_arn
}

output "engine_readonly_policy_arn" {
  value = module.s3kv_cache.engine_readonly_policy_arn
}

output "gc_policy_arn" {
  value = module.s3kv_cache.gc_policy_arn
}

output "engine_role_arn" {
  value = module.s3kv_cache.engine_role_arn
}

output "kv_transfer_config" {
  description = "Pass to vLLM: --kv-transfer-config \"$(terraform output -raw kv_transfer_config)\""
  value       = module.s3kv_cache.kv_transfer_config
}

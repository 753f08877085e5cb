output "bucket_name" {
  description = "Name of the bucket (for a directory bucket, the full `<base>--<az_id>--x-s3` name)."
  value       = local.bucket
}

output "bucket_arn" {
  description = "ARN of the bucket (`arn:<partition>:s3express:...` for a directory bucket)."
  value       = local.bucket_arn
}

output "bucket_type" {
  description = "\"general_purpose\" or \"directory\"."
  value       = var.bucket_type
}

output "prefix" {
  description = "Key prefix that s3kv uses in the bucket."
  value       = var.prefix
}

output "region" {
  description = "Region of the bucket."
  value       = local.region
}

output "engine_policy_arn" {
  description = "ARN of the IAM policy for read-write engines."
  value       = aws_iam_policy.this["engine"].arn
}

output "engine_readonly_policy_arn" {
  description = "ARN of the IAM policy for read-only engines."
  value       = aws_iam_policy.this["engine_readonly"].arn
}

output "gc_policy_arn" {
  description = "ARN of the IAM policy for the garbage collector."
  value       = aws_iam_policy.this["gc"].arn
}

output "policy_json" {
  description = "The three policy documents (JSON), keyed by engine, engine_readonly and gc, for attaching elsewhere (for example as inline or permission-set policies)."
  value       = local.policy_documents
}

output "engine_role_arn" {
  description = "ARN of the engine role, or null when roles.engine is not set."
  value       = try(aws_iam_role.this["engine"].arn, null)
}

output "engine_readonly_role_arn" {
  description = "ARN of the read-only engine role, or null when roles.engine_readonly is not set."
  value       = try(aws_iam_role.this["engine_readonly"].arn, null)
}

output "gc_role_arn" {
  description = "ARN of the garbage-collector role, or null when roles.gc is not set."
  value       = try(aws_iam_role.this["gc"].arn, null)
}

output "kv_transfer_config" {
  description = "JSON for vLLM's `--kv-transfer-config` that points the S3KVConnector at this bucket."
  value = jsonencode({
    kv_connector = "S3KVConnector"
    kv_role      = "kv_both"
    kv_connector_extra_config = {
      bucket = local.bucket
      prefix = var.prefix
      region = local.region
    }
  })
}
